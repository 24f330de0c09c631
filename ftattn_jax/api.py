"""The JAX backend's one dispatcher, and its public entry point ``attention``.

:func:`resolve` validates a call into a :class:`Call` (implementation, the
checks it runs, lowering: decided once); :func:`execute` runs it, with the one
``match`` that knows which implementation runs. The drop-ins (``nn``,
``flax``) translate their arguments and call :func:`dispatch`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from ftattn_spec import implementations, masking, policy
from ftattn_spec import validation as v
from ftattn_spec.axes import LAYOUTS
from ftattn_spec import faults as spec_faults
from ftattn_spec.faults import Fault, FaultDetected
from ftattn_spec.report import Ran, Report
from ftattn_spec.schemes import CHECKS

from . import counters, fused, unfused
from .common import as_stored, explicit_axes, in_auto_mode

_LAYOUT_Q, _LAYOUT_KV = LAYOUTS["jax"]

# ``Report.ran`` is plain data: a pytree node with no leaves, so a report crosses ``jax.jit``
jax.tree_util.register_pytree_node(Ran, lambda r: ((), (r.implementation, r.fallback)), lambda aux, _: Ran(*aux))
# a ``Fault`` is a pytree whose leaves are its index, bit and value: a fault plan can be an argument of
# the user's jitted function, and one compilation serves every fault of the same count and sites
jax.tree_util.register_pytree_node(
    Fault, lambda f: ((f.index, f.bit, f.value), (f.site, f.replica, f.stuck)),
    lambda aux, ch: spec_faults._unchecked_fault(aux[0], ch[0], ch[1], ch[2], aux[1], aux[2]))
_TRACED_FAULTS = (jnp.stack, lambda x, dtype: jnp.asarray(x, dtype))


def _as_array(name: str, x):
    if isinstance(x, (jax.Array, np.ndarray)):
        return x
    raise TypeError(f"{name}: expected a jax.Array or numpy.ndarray of layout "
                    f"{_LAYOUT_Q if name == 'query' else _LAYOUT_KV}, got {type(x).__name__}")


def _dtype_name(x) -> tuple[str, bool]:
    dt = jnp.dtype(x.dtype)
    return dt.name, bool(jnp.issubdtype(dt, jnp.floating))


def _optional(name: str, x):
    if x is None:
        return None
    if isinstance(x, (jax.Array, np.ndarray)):
        return x
    if isinstance(x, (bool, int, float, list, tuple)):
        return np.asarray(x)
    raise TypeError(f"{name}: expected None or a jax.Array/numpy.ndarray, got {type(x).__name__}")


def _spec(x):
    return None if x is None else (tuple(x.shape), jnp.dtype(x.dtype).name)


class Call(NamedTuple):
    """One call, resolved once: the validated settings (implementation and the checks it runs
    included), the mask forms, and for ``"pallas"`` whether it interprets and which kernel
    (``lowering``: ``"triton"`` or ``"mosaic_gpu"``) runs."""

    settings: v.Settings
    masking: masking.Masking
    interpret: bool | None = None
    lowering: str | None = None
    empty: str = "zero"
    #: why ``implementation="auto"`` did not take the fused kernel (None: it did, or was not asked to choose)
    fallback: str | None = None


def resolve(query, key, value, *, bias, mask, scheme, granularity, scale, is_causal, query_seq_lengths,
            key_value_seq_lengths, local_window_size, on_fault, fault, empty, names, implementation=None,
            interpret=None, lowering=None):
    """Validate every argument (errors use ``names`` for the mask arguments) into a :class:`Call`;
    returns ``(call, arrays)``, ``arrays`` the inputs and mask arrays as arrays."""
    impl = implementations.resolve("jax", implementation)
    if lowering is not None:
        fused.validate_lowering(lowering)
        if impl != "pallas":
            raise ValueError(f"lowering: applies to implementation='pallas' only, got "
                             f"implementation={implementation!r}")
    if interpret is not None and not isinstance(interpret, bool):
        raise TypeError(f"interpret: expected None or a bool, got {type(interpret).__name__} {interpret!r}")
    if interpret and impl != "pallas":
        raise ValueError(f"interpret: True applies to implementation='pallas' only, got "
                         f"implementation={implementation!r}")
    query, key, value = (_as_array(n, x) for n, x in (("query", query), ("key", key), ("value", value)))
    extra = [_optional(n, x) for n, x in zip(names, (mask, bias, query_seq_lengths, key_value_seq_lengths))]
    cfg = v.validate_attention("jax", (query.shape, key.shape, value.shape),
                               [_dtype_name(x) for x in (query, key, value)],
                               scheme=scheme, granularity=granularity, scale=scale, is_causal=is_causal,
                               on_fault=on_fault, fault=fault,
                               implementation="unfused" if impl == implementations.AUTO else impl,
                               traced_faults=_TRACED_FAULTS)
    mask, bias, query_seq_lengths, key_value_seq_lengths = extra
    m = masking.validate_masking(cfg.dims, mask=_spec(mask), bias=_spec(bias), query_lengths=_spec(query_seq_lengths),
                                 key_lengths=_spec(key_value_seq_lengths), window=local_window_size, names=names)
    given = list(zip(names, (mask, bias, query_seq_lengths, key_value_seq_lengths, local_window_size)))
    on_gpu = fused.platform_of(query) == "gpu"
    auto = impl == implementations.AUTO
    impl, fallback = implementations.select("jax", impl, device_reason=None if on_gpu else "not on a GPU",
                                            scheme=cfg.scheme, dtype=cfg.dtype, q_shape=query.shape, masking=given)
    if fallback is not None and on_gpu:
        implementations.warn_fallback("jax", fallback)
    if auto:
        cfg = cfg._replace(implementation=impl, checks=implementations.checks_for("jax", impl, cfg.scheme))
    for sites, what in ((spec_faults.BACKWARD_SITES, "backward"), (spec_faults.FUSED_FORWARD_SITES, "forward")):
        if (named := spec_faults.sites_of(fault, sites)) and impl != "pallas":
            raise ValueError(f"fault.site: {named[0]!r} is a site of the fused {what}, which only "
                             f"implementation='pallas' has; this call runs {impl!r}")
    if impl == "pallas":  # the kernel, chosen once (the lowering string is validated above, once)
        interpret = fused.resolve_interpret(query, interpret)
        lowering, why = fused.explain_lowering(query, lowering=lowering, interpret=interpret, plan=cfg.plan,
                                               masked=next((n for n, x in given if x is not None), None),
                                               checks=cfg.checks)
        if why is not None and fused.hopper_ready(query, interpret):  # the call, not the device, kept it off
            implementations.warn_lowering("jax", why)
    return Call(cfg, m, interpret, lowering, empty, fallback), (query, key, value, *extra)


def execute(call: Call, query, key, value, mask=None, bias=None, query_seq_lengths=None,
            key_value_seq_lengths=None, site: str | None = None, warn: bool = False):
    """Run a resolved call: the only place that knows which implementation runs, and the only
    place that applies ``on_fault="raise"`` (the implementations apply ``"correct"`` and ``"nan"``).
    The fused backward counts its verdict under ``site`` plus ``" (backward)"``."""
    cfg = call.settings
    on_fault = "report" if cfg.on_fault == "raise" else cfg.on_fault
    common = dict(checks=cfg.checks, granularity=cfg.granularity, scale=cfg.scale, is_causal=cfg.is_causal,
                  on_fault=on_fault)

    # the plan is an argument, not closed over: explicit mode (below) maps arguments only
    def run(query, key, value, mask, bias, query_seq_lengths, key_value_seq_lengths, plan):
        query, key, value, bias = as_stored(query, key, value, bias)  # kernels and checksums read the same values
        match cfg.implementation:
            case "pallas":
                return fused.run(query, key, value, interpret=call.interpret, lowering=call.lowering,
                                 bias=bias, mask=mask, query_lengths=query_seq_lengths,
                                 key_lengths=key_value_seq_lengths, masks=call.masking, empty=call.empty,
                                 backward=fused.BackwardSettings(f"{site or 'unnamed'} (backward)",
                                                                 cfg.on_fault, warn, counters.record),
                                 plan=plan, **common)
            case "unfused":
                arr = lambda x: None if x is None else jnp.asarray(x)  # noqa: E731
                return unfused.run(query, key, value, bias=arr(bias), mask=arr(mask),
                                   query_lengths=arr(query_seq_lengths), key_lengths=arr(key_value_seq_lengths),
                                   window=call.masking.window, empty=call.empty, plan=plan, **common)
            case other:  # pragma: no cover - the catalogue and this match disagree
                raise NotImplementedError(f"implementation: {other!r} is in the catalogue but not dispatched")

    if explicit_axes(query):  # JAX's explicit sharding mode: the implementations are written for auto mode
        run = in_auto_mode(run, query, functools.partial(_specs, query))
    out, report = run(query, key, value, mask, bias, query_seq_lengths, key_value_seq_lengths, cfg.plan)
    return _finish(out, report._replace(ran=Ran(cfg.implementation, call.fallback)), cfg.on_fault)


def _specs(query, shapes):
    """The ``PartitionSpec``s of a call's ``(out, report)`` in explicit mode: the output as the
    query; per-row report fields ``(B, N, T, ...)`` and per-head ones ``(B, N, ...)`` over the
    query's batch, heads and sequence axes; anything else replicated."""
    P = jax.sharding.PartitionSpec
    b, t, n, h = (tuple(jax.typeof(query).sharding.spec) + (None,) * 4)[:4]
    B, T, N, _ = query.shape

    def spec(x):
        if tuple(x.shape) == tuple(query.shape):
            return P(b, t, n, h)
        if tuple(x.shape[:3]) == (B, N, T):
            return P(b, n, t)
        if tuple(x.shape[:2]) == (B, N):
            return P(b, n)
        return P()
    return jax.tree.map(spec, shapes)


def _finish(out, report: Report, on_fault: str):
    """Restore the checks' order (a jitted function returns dict entries sorted) and apply ``"raise"``."""
    report = report._replace(checks={n: report.checks[n] for n in CHECKS if n in report.checks})
    if on_fault == "raise":
        if isinstance(report.detected, jax.core.Tracer):
            checkify.check(~report.detected, "ftattn: a fault was detected in attention")
        elif bool(report.detected):
            raise FaultDetected(report)
    return out, report


def dispatch(query, key, value, *, takes_report: bool = True, site=None, **kwargs):
    """:func:`resolve`, then :func:`execute`: what every entry point of this backend calls.

    ``takes_report=False`` (a drop-in returning the output alone) puts the call under
    ``ftattn_spec.policy``; every call is counted (``ftattn_jax.counters``) under ``site``
    (default: the caller's file and line).
    """
    site = policy.validate_site(site) or policy.caller_site()
    call, arrays = resolve(query, key, value, **kwargs)
    on_fault, warn = policy.effective_on_fault(call.settings.on_fault, takes_report)
    call = call._replace(settings=call.settings._replace(on_fault=on_fault))
    out, report = execute(call, *arrays, site=site, warn=warn)
    counters.record(site, report, warn)
    return out, report


_NAMES = ("mask", "bias", "query_seq_lengths", "key_value_seq_lengths", "local_window_size")


def attention(query, key, value, *, bias=None, mask=None, scheme: str = "full", granularity: str = "vector",
              scale: float | None = None, is_causal: bool = False, query_seq_lengths=None,
              key_value_seq_lengths=None, local_window_size: int | tuple[int, int] | None = None,
              on_fault: str = "report", fault: Fault | Sequence[Fault] | None = None,
              implementation: str | None = None, interpret: bool | None = None,
              lowering: str | None = None, site: str | int | None = None) -> tuple[jax.Array, Report]:
    """Fault-checked attention in ``jax.nn.dot_product_attention``'s layout.

    Args:
      query: ``(B, T, N, H)`` float16, bfloat16 or float32.
      key, value: ``(B, S, K, H)``, same dtype; ``K`` divides ``N`` (grouped-query
        attention when ``K < N``; query head ``n`` reads kv head ``n // (N // K)``).
      bias: added to the logits ``scale·QKᵀ`` before the softmax; broadcastable
        to ``(B, N, T, S)``.
      mask: bool, True where query ``i`` may attend key ``j``; broadcastable to
        ``(B, N, T, S)``. Masked entries are left out of the checksums.
      scheme: one of ``ftattn_spec.SCHEME_NAMES``.
      granularity: ``"vector"`` (one verdict per row or column) or ``"global"``
        (one per batch and head).
      scale: logit scale, default ``H ** -0.5``.
      is_causal: upper-left-aligned causal mask (query ``i`` attends keys ``j <= i``).
      query_seq_lengths, key_value_seq_lengths: int ``(B,)``; rows and keys at
        or beyond the length are masked.
      local_window_size: ``(left, right)`` or an int: query ``i`` attends keys
        ``i - left <= j <= i + right``.
      on_fault: what a detected fault does. ``"report"``: nothing beyond the
        report. ``"correct"``: repair located single elements of S or O,
        recompute the affected rows, and let a third softmax vote on a DMR
        mismatch. ``"nan"``: set the affected output rows to NaN. ``"raise"``:
        called eagerly, raise ``FaultDetected`` (with ``.report``); under a
        JAX transformation (``jit``, ``vmap``), emit a
        ``jax.experimental.checkify`` check, so wrap the function in
        ``checkify.checkify`` and call ``err.throw()`` (without checkify, JAX
        refuses to trace it and says so).
      fault: a ``ftattn_spec.Fault`` or a sequence of them to inject
        (reproducible fault experiments). Traced data: one compiled function
        serves every fault of the same count.
      implementation: ``None`` or ``"auto"`` (the default): ``"pallas"`` when
        the query is on a GPU and the catalogue (``ftattn_spec.implementations``)
        says the kernel takes the call, else ``"unfused"``; ``report.ran`` says
        which ran and, after a fallback, why (a fallback on a GPU also warns,
        once per reason: ``FallbackWarning``). ``"unfused"`` or ``"xla"`` (an
        alias: the unfused schemes are XLA-compiled). ``"pallas"``: one fused
        flash-attention kernel in Pallas with the checks inside (float16 or
        bfloat16, H in 16, 32, 64, 128, every mask form); its
        ``full`` runs the row checks ``qk_row``, ``softmax_dmr`` and ``pv_row``
        and locates nothing, and ``on_fault="correct"`` recomputes the output
        and replaces the flagged rows. On a GPU it is compiled (Pallas'
        Triton lowering); elsewhere it runs in Pallas' interpret mode, slowly.
      interpret: ``implementation="pallas"`` only: ``True`` runs the kernel in
        Pallas' interpret mode on any device, ``False`` requires compiling it
        (a GPU), ``None`` (the default) interprets unless the query is on a GPU.
      lowering: ``implementation="pallas"`` only: which kernel. ``None`` or
        ``"auto"`` (the default) runs the Hopper kernel (Mosaic GPU: TMA,
        warpgroup MMAs, warp specialization) on an sm_90 GPU for head dims 64
        and 128 without a fault plan and without a mask form but ``is_causal``,
        and the portable kernel (Pallas' Triton lowering) otherwise; ``"triton"`` or ``"mosaic_gpu"`` ask for one
        (``"mosaic_gpu"`` raises ``ValueError`` where it cannot run).
        ``ftattn_jax.fused.select_lowering`` tells which one a call takes.
      site: the name this call is counted under in ``ftattn_jax.counters``
        (an int is a layer index); default the caller's file and line.

    Returns:
      ``(out, report)``: ``out`` is ``(B, T, N, H)`` in the input dtype; ``report``
      is a ``ftattn_spec.Report`` pytree of arrays (see its docs for shapes). A
      row with no attended key has output zero.

    Works under ``jax.jit``, ``jax.vmap`` and ``jax.grad``; all checks run on device
    with no host synchronisation. With ``implementation="pallas"`` the backward is the
    fused one, checked when the forward is (its verdict counted under ``site`` plus
    ``" (backward)"``, docs/faults.md); the unfused path's backward is plain autodiff.
    """
    return dispatch(query, key, value, bias=bias, mask=mask, scheme=scheme, granularity=granularity,
                            scale=scale, is_causal=is_causal, query_seq_lengths=query_seq_lengths,
                            key_value_seq_lengths=key_value_seq_lengths, local_window_size=local_window_size,
                            on_fault=on_fault, fault=fault, empty="zero", names=_NAMES,
                            implementation=implementation, interpret=interpret, lowering=lowering, site=site)
