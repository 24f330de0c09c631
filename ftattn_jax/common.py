"""What the JAX implementations share unchanged: the ``jnp`` spelling of the spec's
array operations, the verdict of a check, and which traces and mesh are in force."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array

from ftattn_spec import tolerances as tol
from ftattn_spec.arrays import ArrayOps
from ftattn_spec.report import CheckResult

F32 = jnp.float32

OPS = ArrayOps(
    arange=jnp.arange,
    ones=lambda shape: jnp.ones(shape, bool),
    where=jnp.where,
    isfinite=jnp.isfinite,
    isnan=jnp.isnan,
    take_last=lambda x, idx: jnp.take_along_axis(x, idx[..., None], axis=-1)[..., 0],
    stack_last=lambda xs: jnp.stack(xs, axis=-1),
    int32=lambda x: x.astype(jnp.int32),
)


def as_stored(*xs):
    """The arrays as they are stored, for code that reads each twice: once in a kernel or a
    product (in their own dtype) and once widened to float32 for a checksum beside it.

    XLA's GPU compiler drops a float32 → float16/bfloat16 → float32 round trip by default
    (``xla_allow_excess_precision``; its pass ``simplify-fp-conversions``): an input computed
    in float32 and cast down inside the same jitted function would reach the float32 sums
    unrounded and the product rounded, and the difference (half an ulp of the input dtype per
    element) is far above the checks' float32 thresholds. An optimization barrier keeps the
    stored values the only ones either side sees. (The CPU compiler keeps the round trip.)
    """
    got = jax.lax.optimization_barrier(tuple(x for x in xs if x is not None))
    it = iter(got)
    out = tuple(None if x is None else next(it) for x in xs)
    return out if len(out) != 1 else out[0]


def verdict(diff: Array, threshold: Array, granularity: str, signed: bool = True,
            ratio: bool = False) -> CheckResult:
    """A ``CheckResult`` from per-row (or per-column) differences and thresholds.

    ``ratio``: ``diff`` is already each row's residual in units of its bound (``softmax_exp``,
    threshold 1), and the global verdict is the worst row's.
    """
    if ratio and granularity == "global":
        residual, threshold = diff.max(axis=-1), threshold.max(axis=-1)
    elif granularity == "global":
        n = diff.shape[-1]
        residual = jnp.abs(diff.sum(axis=-1)) if signed else diff.sum(axis=-1)
        threshold = tol.global_factor(n) * threshold.sum(axis=-1)
    else:
        residual = jnp.abs(diff)
    residual = residual.astype(F32)
    threshold = threshold.astype(F32)
    return CheckResult(residual, threshold, ~((residual <= threshold) & jnp.isfinite(threshold)))


def trace_kinds() -> list[str] | None:
    """The class names of the traces in force, innermost first (None: this jax does not say; the
    one place the package reads JAX's trace internals)."""
    try:
        from jax._src import core
        trace = core.trace_ctx.trace
    except (ImportError, AttributeError):  # pragma: no cover - another jax
        return None
    kinds = []
    while trace is not None and len(kinds) < 64:
        kinds.append(type(trace).__name__)
        trace = getattr(trace, "parent_trace", None)
    return kinds


def manual_mesh() -> bool:
    """Whether a mesh with manual axes is in force (inside ``shard_map``)."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = get() if get is not None else None
    return bool(getattr(mesh, "manual_axes", ()))


def concrete_mesh():
    """The ``jax.sharding.Mesh`` that ``jax.set_mesh`` put in force, also while a function is being
    traced under it (``jax.sharding.get_mesh`` refuses inside ``jit``); None when there is none or
    this jax does not say (JAX's private ``get_concrete_mesh``, jax 0.10.2 to 0.11.2)."""
    try:
        from jax._src import mesh as mesh_lib
        mesh = mesh_lib.get_concrete_mesh()
    except (ImportError, AttributeError):  # pragma: no cover - another jax
        return None
    if mesh is None or getattr(mesh, "empty", True) or getattr(mesh, "devices", None) is None:
        return None
    return mesh


def explicit_axes(x) -> tuple[str, ...]:
    """The mesh axes of ``x``'s sharding in JAX's explicit mode (``jax.sharding.AxisType.Explicit``,
    the default of ``jax.make_mesh``): () for an unsharded array or one on axes in auto mode."""
    typeof = getattr(jax, "typeof", None)
    if typeof is None or not all(hasattr(jax.sharding, n) for n in ("auto_axes", "use_abstract_mesh")):  # pragma: no cover
        return ()
    try:
        mesh = typeof(x).sharding.mesh
    except (AttributeError, TypeError):
        return ()
    return tuple(getattr(mesh, "explicit_axes", ()) or ())


def in_auto_mode(fn, like, specs_of):
    """``fn`` (code written for JAX's auto mode, where the compiler places what an operation needs)
    as a function callable on arrays sharded in explicit mode like ``like``: ``jax.sharding.auto_axes``
    over ``like``'s explicit axes, under its mesh. Explicit mode refuses an operation whose
    output sharding it cannot infer (a gather, a select of a replicated mask against a sharded
    array). ``specs_of(shapes)`` gives the outputs' ``PartitionSpec``s from their
    ``jax.ShapeDtypeStruct``s (found by tracing ``fn`` once more, abstractly)."""
    mesh = jax.typeof(like).sharding.mesh
    axes = explicit_axes(like)
    P = jax.sharding.PartitionSpec

    def run(*args):
        with jax.sharding.use_abstract_mesh(mesh):
            shapes = jax.eval_shape(jax.sharding.auto_axes(fn, axes=axes, out_sharding=P()), *args)
            return jax.sharding.auto_axes(fn, axes=axes, out_sharding=specs_of(shapes))(*args)
    return run
