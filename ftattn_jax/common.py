"""What the JAX implementations share unchanged: the ``jnp`` spelling of the spec's
array operations, the verdict of a check, and which traces are in force."""

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
