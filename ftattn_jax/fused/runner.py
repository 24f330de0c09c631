"""``implementation="pallas"``: run one of the fused, self-checking kernels of this package.

``api`` validates a call and calls :func:`run`. This module chooses the kernel
(:func:`select_lowering`: the Hopper kernel of :mod:`.mosaic_kernel` or the
portable one of :mod:`.pallas_kernel`, both with the interface of a kernel
module), turns its per-row statistics into the usual ``Report``, applies
``on_fault``, and gives ``jax.grad`` the fused backward (a ``custom_vjp``:
:mod:`.pallas_backward`'s kernels, checked when the forward is, their verdict
handled by :mod:`.gradients`).

The kernels check rows only (``qk_row``, ``softmax_dmr``, ``softmax_exp``, ``pv_row``;
``softmax_exp`` in the portable kernel only), like the Triton kernel of ``ftattn_torch``:
``full`` runs ``qk_row``, ``softmax_dmr`` and ``pv_row``, ``located`` is empty, and
``on_fault="correct"`` recomputes the output (once, only when something was flagged) and
takes the flagged rows from the recomputation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ftattn_spec import faults as spec_faults
from ftattn_spec import masking
from ftattn_spec.report import make_report

from .. import faults
from ..common import OPS, as_stored, verdict
from . import compat, gradients, partitioned
from . import mosaic_kernel as mosaic
from . import pallas_backward as backward
from . import pallas_kernel as portable
from .side_inputs import KernelOutput

F32 = jnp.float32
_CHECK_ORDER = ("qk_row", "softmax_dmr", "softmax_exp", "pv_row")
#: the kernel modules, by lowering name; ``"auto"`` chooses between them
KERNELS = {portable.LOWERING: portable, mosaic.LOWERING: mosaic}
LOWERINGS = ("auto", *KERNELS)
BlockSizes, MosaicBlocks = portable.BlockSizes, mosaic.MosaicBlocks


def platform_of(x) -> str:
    """The platform an array lives on (``"cpu"``, ``"gpu"``...); for a tracer, the default backend."""
    try:
        return next(iter(x.devices())).platform
    except (AttributeError, jax.errors.ConcretizationTypeError, StopIteration, TypeError):
        return jax.default_backend()


def config(q_shape, k_shape, dtype: str, *, scale, causal, which, n_faults, blocks, interpret, debug=False,
           masking=None, uniform: bool = False):
    """The static settings of a launch of the kernel ``blocks`` belongs to (the mask forms
    besides ``causal`` only for the portable kernel: :func:`select_lowering`)."""
    extra = dict(masking=masking, uniform=uniform) if blocks.LOWERING == portable.LOWERING else {}
    return KERNELS[blocks.LOWERING].config(q_shape, k_shape, dtype, scale=scale, causal=causal, which=which,
                                           n_faults=n_faults, blocks=blocks, interpret=interpret, debug=debug,
                                           **extra)


def launch(q, k, v, ft, fv, cfg, masks=portable.Masks()) -> KernelOutput:
    """Run the kernel ``cfg`` was made for (no gradient rule: see :func:`_attend`), partitioned
    over batch and heads where the inputs may be sharded (:mod:`.partitioned`)."""
    return partitioned.forward(_launch_here, q, k, v, ft, fv, cfg, masks)


def _launch_here(q, k, v, ft, fv, cfg, masks) -> KernelOutput:
    if cfg.LOWERING == portable.LOWERING:
        return portable.launch(q, k, v, ft, fv, cfg, masks)
    return KERNELS[cfg.LOWERING].launch(q, k, v, ft, fv, cfg)


def _allowed(cfg, B: int, T: int, S: int, mask, query_lengths, key_lengths):
    """The combined mask forms (but ``causal``) as JAX's ``masking.combine`` makes them, or None."""
    return masking.combine(B, T, S, OPS, mask=mask, window=getattr(cfg, "window", None),
                           query_lengths=query_lengths, key_lengths=key_lengths)


class BackwardSettings(NamedTuple):
    """What the fused backward does with its verdict (static: part of the compiled function).

    ``record(site, report, warn)`` counts it (``ftattn_jax.counters.record``, handed in by the
    API layer) under ``site``; ``on_fault`` is the caller's policy: ``"nan"`` and ``"raise"``
    poison the implicated gradient rows (a traced backward cannot raise; the count and, for
    ``"raise"``, a ``FaultWarning`` say why), ``"correct"`` runs the backward again without the
    plan's faults when something was flagged."""

    site: str = "unnamed (backward)"
    on_fault: str = "report"
    warn: bool = False
    record: Callable | None = None


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _attend(q, k, v, bias, aux, ft, fv, cfg, grad: BackwardSettings):
    mask, qlen, klen = aux
    return launch(q, k, v, ft, fv, cfg, portable.Masks(mask, bias, qlen, klen))


def _trainable(cfg, q_shape, k_shape, dtype: str, n_faults: int):
    """The portable kernel's config that computes what ``cfg`` does and saves the log-sum-exp: the
    Hopper kernel does not save it yet, so a differentiated call runs the portable forward."""
    if cfg.LOWERING == portable.LOWERING:
        return dataclasses.replace(cfg, lse=True)
    which = tuple(n for n, on in zip(_CHECK_ORDER, (cfg.qk, cfg.dmr, cfg.exp, cfg.pv)) if on)
    bs = portable.BlockSizes.get_default(False, q_shape[-1], bool(which))
    fwd = portable.config(q_shape, k_shape, dtype, scale=cfg.scale, causal=cfg.causal, which=which,
                          n_faults=n_faults, blocks=bs, interpret=False)
    return dataclasses.replace(fwd, lse=True)


def _attend_fwd(q, k, v, bias, aux, ft, fv, cfg, grad):
    mask, qlen, klen = aux
    n_faults = 0 if fv is None else fv.shape[0]
    fwd = _trainable(cfg, q.shape, k.shape, jnp.dtype(q.dtype).name, n_faults)
    got = launch(q, k, v, ft, fv, fwd, portable.Masks(mask, bias, qlen, klen))
    return got._replace(lse=None), (q, k, v, bias, aux, ft, fv, got.out, got.lse)


def _attend_bwd(cfg, grad, res, cts):
    q, k, v, bias, aux, ft, fv, out, lse = res
    q, k, v, out, do = as_stored(q, k, v, out, cts[0])  # the kernels and the side sums read the same values
    mask, qlen, klen = aux
    dtype = jnp.dtype(q.dtype).name
    fwd = _trainable(cfg, q.shape, k.shape, dtype, 0 if fv is None else fv.shape[0])
    checks = bool(fwd.qk or fwd.dmr or fwd.exp or fwd.pv)
    bcfg = backward.backward_config(fwd, q.shape[-1], dtype, checks=checks)
    masks = portable.Masks(mask, bias, qlen, klen)
    dq, dk, dv, dbias = gradients.checked(q, k, v, out, lse, do, ft, fv, bcfg, masks, grad, fwd.uniform)
    zero_int = lambda x: None if x is None else np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731
    return (dq, dk, dv, dbias, tuple(zero_int(x) for x in aux), zero_int(ft),
            None if fv is None else jnp.zeros_like(fv))


_attend.defvjp(_attend_fwd, _attend_bwd)


def _fault_table(plan: faults.DevicePlan | None):
    """The plan as the kernel's int32 ``(F·8,)`` rows (``ftattn_spec.faults.FAULT_ROW``) and
    float32 ``(F,)`` values, F padded to a power of two."""
    if plan is None or plan.site.shape[0] == 0:
        return None, None, 0
    F = plan.site.shape[0]
    Fp = 1 << (F - 1).bit_length()
    ints, values = spec_faults.pack_rows(plan, jnp.concatenate)
    ints = jnp.concatenate([ints.astype(jnp.int32), jnp.full((Fp - F, 8), -1, jnp.int32)])
    values = jnp.concatenate([values.astype(F32), jnp.zeros((Fp - F,), F32)])
    return ints.reshape(-1), values, Fp


def mosaic_can_inject() -> bool:
    """Whether the Hopper kernel can inject faults itself (jax >= 0.11)."""
    return mosaic.can_inject()


def validate_lowering(lowering) -> str:
    """``lowering`` as one of ``LOWERINGS`` (None is ``"auto"``), or ``ValueError`` naming it."""
    if lowering is None:
        return "auto"
    if not isinstance(lowering, str) or lowering not in LOWERINGS:
        raise ValueError(f"lowering: expected None or one of {LOWERINGS}, got {lowering!r}")
    return lowering


def select_lowering(query, *, lowering: str | None = None, interpret: bool | None = None, plan=None,
                    masked: str | None = None, checks: tuple[str, ...] = ()) -> str:
    """Which kernel ``implementation="pallas"`` runs: ``"triton"`` (the portable
    kernel) or ``"mosaic_gpu"`` (the Hopper kernel).

    ``lowering=None``/``"auto"`` takes the Hopper kernel when the query lives on
    an sm_90 GPU, the kernel is compiled (not interpreted), the head dim is 64
    or 128, no mask form but ``is_causal`` is given (``masked``: the name of
    one that is), the ``checks`` to run are among its own (not ``softmax_exp``),
    and a fault plan, if any, has at most one fault per site and
    query row (the Hopper kernel reads faults from a per-row table) on jax >= 0.11;
    otherwise the portable kernel (:func:`explain_lowering` says why). Asking for
    ``"mosaic_gpu"`` where it cannot run raises ``ValueError`` naming why.
    """
    return explain_lowering(query, lowering=lowering, interpret=interpret, plan=plan, masked=masked,
                            checks=checks)[0]


def explain_lowering(query, *, lowering: str | None = None, interpret: bool | None = None, plan=None,
                     masked: str | None = None, checks: tuple[str, ...] = ()) -> tuple[str, str | None]:
    """:func:`select_lowering`'s choice and, where ``"auto"`` did not take the Hopper kernel, why."""
    if lowering not in KERNELS:  # a name resolved before needs no second validation
        lowering = validate_lowering(lowering)
    if lowering == portable.LOWERING:
        return lowering, None
    why = mosaic.unsupported(query, platform=platform_of(query), interpret=interpret, plan=plan, checks=checks)
    if why is None and masked is not None:
        why = f"it supports is_causal only, and {masked} was given (the portable kernel takes every mask form)"
    if why is None:
        return mosaic.LOWERING, None
    if lowering == mosaic.LOWERING:
        raise ValueError(f"lowering: 'mosaic_gpu' cannot run here: {why}")
    return portable.LOWERING, why


def hopper_ready(query, interpret: bool | None) -> bool:
    """Whether the Hopper kernel could run on this query's device at all (an sm_90 GPU, compiled,
    a supported jax): when it could and ``"auto"`` took the portable kernel, the call's arguments
    (a mask form, a scheme's checks, a fault plan) decided, and the user is told."""
    return mosaic.unsupported(query, platform=platform_of(query), interpret=interpret) is None


def resolve_interpret(query, interpret: bool | None) -> bool:
    """``interpret=None`` as a bool: interpret unless the query lives on a GPU; ``False`` off a GPU is an error."""
    platform = platform_of(query)
    if interpret is None:
        return platform != "gpu"
    if not interpret and platform != "gpu":
        raise ValueError(f"interpret: False compiles the kernel for a GPU, but the query is on {platform!r}; "
                         f"use interpret=None or True to run it in Pallas' interpret mode")
    return interpret


def run(query, key, value, *, checks: tuple[str, ...], granularity: str, scale: float, is_causal: bool,
        on_fault: str = "report", plan=None, interpret: bool | None = None, blocks=None,
        lowering: str | None = None, bias=None, mask=None, query_lengths=None, key_lengths=None,
        masks: masking.Masking | None = None, empty: str = "zero", backward: BackwardSettings | None = None):
    """The fused path: inputs validated, the catalogue consulted; ``checks`` are those to run.

    ``interpret=None`` interprets unless the query lives on a GPU;
    ``lowering`` picks the kernel (:func:`select_lowering`); with ``lowering`` None or
    ``"auto"``, ``blocks`` (a kernel's block sizes) names it. The mask arrays and
    ``masks`` (their validated ``ftattn_spec.masking.Masking``, window included) are those
    of the unfused path; ``empty`` how a row with nothing attended is filled; ``backward`` what
    the fused backward does with its verdict (:class:`BackwardSettings`).
    """
    interpret = resolve_interpret(query, interpret)
    if blocks is not None and lowering in (None, "auto"):  # the settings name their kernel
        lowering = getattr(blocks, "LOWERING", None)
    given = _first_form(masks)
    chosen = select_lowering(query, lowering=lowering, interpret=interpret, plan=plan, masked=given,
                             checks=tuple(checks))
    kind = KERNELS[chosen].Blocks
    if blocks is not None and not isinstance(blocks, kind):
        raise TypeError(f"blocks: the {chosen!r} lowering expected {kind.__name__}, got {type(blocks).__name__}")
    bs = blocks or kind.get_default(interpret, query.shape[-1], bool(checks))
    aux = tuple(None if x is None else jnp.asarray(x) for x in (mask, query_lengths, key_lengths))
    with compat.quiet_lowering():
        return _run(query, key, value, None if bias is None else jnp.asarray(bias), aux, faults.to_device(plan),
                    checks=tuple(checks), granularity=granularity, scale=scale, is_causal=is_causal,
                    on_fault=on_fault, interpret=bool(interpret), blocks=bs, masks=masks if given else None,
                    uniform=empty == "uniform", grad=backward or BackwardSettings())


def _verdicts(stats, wanted: tuple[str, ...], granularity: str) -> dict:
    """The kernel's (difference, threshold) pairs as ``CheckResult``s, in ``_CHECK_ORDER``."""
    results, stat = {}, iter(stats)
    for name in _CHECK_ORDER:
        if name in wanted:
            diff, thr = next(stat), next(stat)
            # softmax_exp's diff is each row's ratio to its bound (threshold 1): the global verdict is the worst row
            results[name] = verdict(diff, thr, granularity, signed=name not in ("softmax_dmr", "softmax_exp"),
                                    ratio=name == "softmax_exp")
    return results


def block(query: Float[Array, "B T N H"], key: Float[Array, "B S K H"], value: Float[Array, "B S K H"], plan, *,
          checks: tuple[str, ...], scale: float, is_causal: bool, interpret: bool | None = None):
    """One block of ring attention by the portable kernel, which saves each row's log-sum-exp:
    ``(out, lse, Report)``, ``out`` in the input dtype, ``lse`` float32 ``(B, N, T)`` in base e of
    the scaled logits (−inf where nothing is attended), the report's checks per row (vector
    granularity, nothing repaired). ``plan``: a ``DevicePlan`` of S, P and O faults, or None. No
    gradient of its own: ring attention differentiates the whole ring."""
    interpret = resolve_interpret(query, interpret)
    bs = portable.BlockSizes.get_default(interpret, query.shape[-1], bool(checks))
    with compat.quiet_lowering():
        return _block(query, key, value, plan, checks=tuple(checks), scale=scale, is_causal=is_causal,
                      interpret=interpret, blocks=bs)


@functools.partial(jax.jit, static_argnames=("checks", "scale", "is_causal", "interpret", "blocks"))
def _block(query, key, value, plan, *, checks, scale, is_causal, interpret, blocks):
    ft, fv, n_faults = _fault_table(plan)
    cfg = portable.config(query.shape, key.shape, jnp.dtype(query.dtype).name, scale=scale, causal=is_causal,
                          which=checks, n_faults=n_faults, blocks=blocks, interpret=interpret)
    got = launch(query, key, value, ft, fv, dataclasses.replace(cfg, lse=True))
    lse = jnp.where(got.lse == jnp.inf, -jnp.inf, got.lse * np.float32(np.log(2.0)))
    results = _verdicts(got.stats, checks, "vector")
    detected = jnp.zeros((), bool)
    for r in results.values():
        detected = detected | jnp.any(r.flagged)
    finite = jnp.all(got.qfin > 0) & got.kv_finite
    return got.out, lse, make_report(detected=detected, checks=results, inputs_finite=finite, located={},
                                     corrected=jnp.zeros((), jnp.int32))


def ring_backward_config(query, key, plan, *, checks: tuple[str, ...], scale: float, is_causal: bool,
                         interpret: bool | None = None) -> backward.BackwardConfig:
    """The settings of :func:`block_backward` for one block of ring attention: the portable
    kernels' backward of the ring's fused blocks (:func:`block`'s tiles), ``partial``."""
    interpret = resolve_interpret(query, interpret)
    dtype = jnp.dtype(query.dtype).name
    n_faults = _fault_table(plan)[2]
    bs = portable.BlockSizes.get_default(interpret, query.shape[-1], bool(checks))
    fwd = portable.config(query.shape, key.shape, dtype, scale=scale, causal=is_causal, which=tuple(checks),
                          n_faults=n_faults, blocks=bs, interpret=interpret)
    return backward.backward_config(fwd, query.shape[-1], dtype, checks=bool(checks), partial=True)


def block_backward(query, key, value, out, lse2, grad_out, plan, cfg: backward.BackwardConfig):
    """The backward of one block of ring attention by the portable kernels (:mod:`.pallas_backward`,
    ``cfg`` from :func:`ring_backward_config`): a ``BackwardOutput`` with float32 gradients and
    ``bwd_softmax``'s residual the rows' signed Σ p over this block's keys. ``out`` is the
    rows' merged output, ``lse2`` float32 ``(B, N, T)`` their merged log-sum-exp in base 2
    (+inf where nothing is attended); ``plan`` a ``DevicePlan`` of the backward's sites, or None.
    Called inside the ring's ``shard_map``: nothing is partitioned here."""
    ft, fv, _ = _fault_table(plan)
    with compat.quiet_lowering():
        return backward.launch(query, key, value, out, lse2, grad_out, ft, fv, cfg, portable.Masks())


def _first_form(masks) -> str | None:
    """The name of the first mask form but ``is_causal`` in ``masks``, or None."""
    if masks is None:
        return None
    for name, on in (("mask", masks.mask_shape is not None), ("bias", masks.bias_shape is not None),
                     ("query_seq_lengths", masks.query_lengths), ("key_value_seq_lengths", masks.key_lengths),
                     ("local_window_size", masks.window is not None)):
        if on:
            return name
    return None


@functools.partial(jax.jit, static_argnames=("checks", "granularity", "scale", "is_causal", "on_fault",
                                             "interpret", "blocks", "masks", "uniform", "grad"))
def _run(query: Float[Array, "B T N H"], key: Float[Array, "B S K H"], value: Float[Array, "B S K H"], bias, aux,
         plan, *, checks: tuple[str, ...], granularity: str, scale: float, is_causal: bool, on_fault: str,
         interpret: bool, blocks: "BlockSizes | MosaicBlocks", masks, uniform: bool, grad: BackwardSettings):
    wanted = checks
    dtype = jnp.dtype(query.dtype).name
    ft, fv, n_faults = _fault_table(plan)
    q = faults.inject(query, "query", "BTNH", plan)
    k = faults.inject(key, "key", "BSKH", plan)
    v = faults.inject(value, "value", "BSKH", plan)
    cfg = config(query.shape, key.shape, dtype, scale=scale, causal=is_causal, which=wanted, n_faults=n_faults,
                 blocks=blocks, interpret=interpret, masking=masks, uniform=uniform)
    out, qfin, stats, kv_finite, _ = _attend(q, k, v, bias, aux, ft, fv, cfg, grad)
    qfin, stats = jax.lax.stop_gradient((qfin, stats))
    if plan is None:
        finite = jnp.all(qfin > 0) & kv_finite
    else:  # the kernel saw the corrupted inputs: judge the originals
        finite = jnp.all(jnp.isfinite(query)) & jnp.all(jnp.isfinite(key)) & jnp.all(jnp.isfinite(value))
    T = query.shape[1]
    results, rows = _verdicts(stats, wanted, granularity), None
    for r in results.values():
        flag = jnp.broadcast_to(r.flagged[..., None], (*r.flagged.shape, T)) if granularity == "global" \
            else r.flagged
        rows = flag if rows is None else rows | flag
    detected = jnp.zeros((), bool)
    for r in results.values():
        detected = detected | jnp.any(r.flagged)
    corrected = jnp.zeros((), jnp.int32)
    if on_fault in ("correct", "nan") and rows is not None:
        rows_btn = jnp.swapaxes(rows, 1, 2)[..., None]  # B T N 1
        if on_fault == "correct":
            clean = config(query.shape, key.shape, dtype, scale=scale, causal=is_causal, which=(), n_faults=0,
                           blocks=blocks, interpret=interpret, masking=masks, uniform=uniform)
            redo = lambda o: jnp.where(rows_btn, _attend(q, k, v, bias, aux, None, None, clean, grad)[0], o)  # noqa: E731
            out = jax.lax.cond(detected, redo, lambda o: o, out)
            corrected = jnp.sum(rows, dtype=jnp.int32)
        else:
            out = jnp.where(rows_btn, jnp.asarray(jnp.nan, out.dtype), out)
    results = {name: results[name] for name in wanted}
    return out, make_report(detected=detected, checks=results, inputs_finite=finite, located={}, corrected=corrected)
