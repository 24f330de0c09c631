"""The unfused schemes: S = scale·QKᵀ, softmax (optionally twice), O = P·V, and the checks.

Everything here runs under ``jax.jit``; ``api.attention`` validates arguments
and calls :func:`run` with static settings.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from ftattn_spec import tolerances as tol
from ftattn_spec.report import make_report

from ftattn_spec import localization, masking

from .. import faults
from ..common import OPS, verdict
from . import checks as abft

F32 = jnp.float32
SOFTMAX = ("softmax_dmr", "softmax_exp")  # the checks of P, judged as unsigned per-row values
NEG = abft.NEG  # masked logits: large, finite, so no row is NaN
LOG2E = abft.LOG2E


def _precision(dtype: str):
    # float32 inputs get true float32 products (no TF32), as the tolerance
    # model assumes; float16/bfloat16 products are exact at any precision.
    return lax.Precision.HIGHEST if dtype in ("float32", "float64") else None


def _exp_rows(l: Float[Array, "B N T S"], guard: bool, exp, scale=None):
    """``(exp(l − m), m)`` per row (``exp(·)`` is ``exp`` applied to ``(l − m)·scale``).

    XLA re-forms ``l`` inside every fusion that reads it, and may contract
    ``scale·x − m`` into a fused multiply-add there, so the ``l`` an
    exponential sees can exceed the ``m`` a reduction found by a rounding of
    ``|l|`` (above ``|l|`` ≈ 1e9 that overflows ``exp``, seen on CPU). So the
    row's first maximal entry, and any entry whose argument came out positive,
    get exactly ``exp(0) = 1``: every row stays finite with a sum ≥ 1, no value
    moves further from the exact one, and ``tol.dmr_logit_coefficient``
    bounds what the re-evaluation leaves between the replicas. Gradients are
    those of ``exp`` (1 at an argument of 0), with the maximum held constant
    as in ``jax.nn.softmax``.
    """
    m = lax.stop_gradient(jnp.max(l, axis=-1, keepdims=True))
    top = (lax.broadcasted_iota(jnp.int32, l.shape, l.ndim - 1) == jnp.argmax(l, axis=-1)[..., None]) \
        & jnp.isfinite(m)
    if guard:
        m = jnp.where(m == -jnp.inf, 0.0, m)
    arg = l - m if scale is None else (l - m) * scale
    one = top | (arg > 0)
    return jnp.where(one, 1.0 + (arg - lax.stop_gradient(arg)), exp(jnp.where(one, 0.0, arg))), m


def _lse(m, d) -> Float[Array, "B N T"]:
    """A row's natural log-sum-exp ``m + ln d`` from its maximum and row sum; −inf for a row
    with nothing attended (``d = 0``)."""
    return jnp.where(d > 0, m + jnp.log(jnp.where(d > 0, d, 1.0)), -jnp.inf)[..., 0]


def _softmax(l: Float[Array, "B N T S"], keep, guard: bool, stats: bool = False):
    """Replica 1: exp(l - m) / Σ exp(l - m), zero outside ``keep``; with ``stats``, also the
    row's log-sum-exp (:func:`_lse`).

    ``guard`` (any mask or bias) makes a row with no kept entry, or whose
    logits are all -inf, give zeros instead of NaN.
    """
    z, m = _exp_rows(l, guard, jnp.exp)
    if keep is not None:
        z = jnp.where(keep, z, 0.0)
    d = jnp.sum(z, axis=-1, keepdims=True)
    p = z / (jnp.where(d > 0, d, 1.0) if guard else d)
    return (p, _lse(m, d)) if stats else p


def _softmax_replica(l: Float[Array, "B N T S"], keep, guard: bool) -> tuple[Float[Array, "B N T S"], Float[Array, "B N T"]]:
    """Replica 2: an independent evaluation that the compiler cannot merge with replica 1.

    It uses a different formula (a base-2 exponential of the argument scaled by
    log₂ e, a two-level sum, a multiply by the reciprocal sum), and both its
    input and the constant log₂ e pass an optimization barrier. The constant
    matters: ``exp2(y)`` lowers to ``exp(y·ln 2)``, float32 ``log₂ e · ln 2``
    is exactly 1, and XLA folds the two constants and then merges the two
    exponentials (seen with jax 0.10.2 on CPU). ``tests/test_jax_backend.py``
    counts the exponentials in the compiled HLO.
    """
    l, log2e = lax.optimization_barrier((l, jnp.asarray(LOG2E, l.dtype)))
    z, m = _exp_rows(l, guard, jnp.exp2, log2e)
    if keep is not None:
        z = jnp.where(keep, z, 0.0)
    d = abft.blocked_sum(z, -1)[..., None]
    return z * (1.0 / (jnp.where(d > 0, d, 1.0) if guard else d)), _lse(m, d)


def _logit_magnitude(s, logits, attended, p, p_replica) -> Float[Array, "B N T"]:
    """``μ_i`` of ``tol.dmr_logit_coefficient``: the largest ``max(|s_ij|, |l_ij|)``
    over the attended entries where either replica's probability is nonzero."""
    mag = jnp.abs(s) if logits is s else jnp.maximum(jnp.abs(s), jnp.abs(logits))
    live = (p != 0) | (p_replica != 0)
    if attended is not None:
        live = live & attended
    return jnp.max(jnp.where(live, mag, 0.0), axis=-1)


def _working(dtype) -> type:
    """The precision of the computation: float64 for float64 inputs, float32 otherwise."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else F32


def _scores(qg: Float[Array, "B T K G H"], key: Float[Array, "B S K H"], scale: float, prec) -> Float[Array, "B N T S"]:
    B, T, K, G, H = qg.shape
    s = jnp.einsum("btkgh,bskh->bkgts", qg, key, precision=prec, preferred_element_type=_working(qg.dtype))
    return s.reshape(B, K * G, T, key.shape[1]) * scale


def _outputs(p_mma: Array, value: Float[Array, "B S K H"], prec) -> Float[Array, "B T K G H"]:
    return jnp.einsum("bkgts,bskh->btkgh", p_mma, value, precision=prec, preferred_element_type=_working(value.dtype))


def _rows(found: dict, results: dict, row: str, col: str, granularity: str, n_rows: int, located):
    """Rows (``B N T``) implicated by a stage's checks, or None if it runs none."""
    names = [c for c in (row, col) if c in found]
    if not names:
        return None
    if granularity == "global":
        head = functools.reduce(jnp.logical_or, [results[c].flagged for c in names])
        return jnp.broadcast_to(head[..., None], (*head.shape, n_rows))
    get = lambda c: localization.flags(*found[c], OPS) if c in found else None  # noqa: E731
    return localization.affected_rows(get(row), get(col), n_rows, located, OPS)


def _count(x: Array) -> Array:
    return jnp.sum(x, dtype=jnp.int32)


def run(query, key, value, *, checks: tuple[str, ...], granularity: str, scale: float, is_causal: bool,
        on_fault: str = "report", plan=None, bias=None, mask=None, query_lengths=None, key_lengths=None,
        window=None, empty: str = "zero"):
    """Run ``checks`` (a scheme's, in ``CHECKS`` order); ``plan`` is a validated ``FaultPlan`` or None.

    The mask arguments are those of ``ftattn_spec.masking`` (validated);
    ``empty`` says how a fully masked row is filled (``"zero"`` or ``"uniform"``).
    """
    masks = (bias, mask, query_lengths, key_lengths)
    return _run(query, key, value, faults.to_device(plan), masks, checks=tuple(checks), granularity=granularity,
                scale=scale, is_causal=is_causal, on_fault=on_fault, window=window, empty=empty)


class Block(NamedTuple):
    """One block of a ring (:func:`block`): the output in the working precision, and per row
    (``B N T``) the log-sum-exp of the logits, a second one evaluated apart (the DMR replica's,
    else the exponential checksum's; None when the scheme checks no softmax), and the row's
    logit magnitude μ (the largest ``|l|`` over its attended entries), which bounds their gap
    (``ftattn_spec.ring.lse_threshold``)."""

    out: Array
    lse: Array
    lse_check: Array | None
    mu: Array


def block(query, key, value, plan, *, checks: tuple[str, ...], scale: float, is_causal: bool):
    """One block of ring attention, traced inside the caller's function: ``(Block, Report)``.
    ``plan`` is a ``DevicePlan`` (or None); vector granularity, no repair."""
    return _run(query, key, value, plan, (None, None, None, None), checks=tuple(checks), granularity="vector",
                scale=scale, is_causal=is_causal, on_fault="report", window=None, empty="zero", stats=True)


@functools.partial(jax.jit, static_argnames=("checks", "granularity", "scale", "is_causal", "on_fault", "window",
                                             "empty", "stats"))
def _run(query: Float[Array, "B T N H"], key: Float[Array, "B S K H"], value: Float[Array, "B S K H"],
         plan, masks, *, checks: tuple[str, ...], granularity: str, scale: float, is_causal: bool, on_fault: str,
         window, empty: str, stats: bool = False):
    bias, mask, query_lengths, key_lengths = masks
    finite = jnp.all(jnp.isfinite(query)) & jnp.all(jnp.isfinite(key)) & jnp.all(jnp.isfinite(value))
    query = faults.inject(query, "query", "BTNH", plan)
    key = faults.inject(key, "key", "BSKH", plan)
    value = faults.inject(value, "value", "BSKH", plan)
    B, T, N, H = query.shape
    S, K = key.shape[1], key.shape[2]
    G = N // K
    dtype = jnp.dtype(query.dtype).name
    wanted = checks
    prec = _precision(dtype)
    correct = on_fault == "correct"
    acts = on_fault in ("correct", "nan")  # only these need the implicated rows
    bi, ni = jnp.arange(B)[:, None], jnp.arange(N)[None, :]
    found, results, located, affected = {}, {}, {}, []
    corrected = jnp.zeros((), jnp.int32)

    def judge(names):
        for name in names:
            if name in wanted:
                results[name] = verdict(*found[name], granularity, signed=name not in SOFTMAX,
                                        ratio=(name == "softmax_exp"))

    # ---- S = scale·QKᵀ: inject, check, locate, repair
    qg = query.reshape(B, T, K, G, H)
    s = faults.inject(_scores(qg, key, scale, prec), "scores", "BNTS", plan)
    if "softmax_dmr" in wanted:
        # Both replicas read S through one barrier. It does not stop XLA from
        # re-forming scale·(QKᵀ) inside each fusion that reads it (seen on
        # CPU), so the softmax tolerates a re-evaluated logit (``_exp_rows``)
        # and the DMR threshold bounds it (``tol.dmr_logit_coefficient``).
        s = lax.optimization_barrier(s)
    allowed = masking.combine(B, T, S, OPS, mask=mask, is_causal=is_causal, window=window,
                                query_lengths=query_lengths, key_lengths=key_lengths)
    allowed_ts = masking.attended(allowed, is_causal, T, S, OPS)  # None or B|1 N|1 T S
    guard = allowed is not None or bias is not None
    if {"qk_row", "qk_col"} & set(wanted):
        s_masked = s if allowed_ts is None else jnp.where(allowed_ts, s, 0.0)
        if "qk_row" in wanted:
            found["qk_row"] = abft.qk_row(qg, key, s_masked, scale, is_causal, dtype, allowed)
        if "qk_col" in wanted:
            found["qk_col"] = abft.qk_col(qg, key, s_masked, scale, is_causal, dtype, allowed)
        judge(("qk_row", "qk_col"))
        loc = None
        if "qk_row" in found and "qk_col" in found and granularity == "vector":
            qf, kf = query.astype(_working(query.dtype)), key.astype(_working(query.dtype))
            general = allowed is not None
            if allowed_ts is None:
                attended = lambda i, j: True  # noqa: E731
            else:
                full = jnp.broadcast_to(allowed_ts, (B, N, T, S))
                attended = lambda i, j: full[bi, ni, i, j]  # noqa: E731
            loc = localization.locate(
                found["qk_row"], found["qk_col"],
                (tol.qk_coefficient(S, H, dtype, masked=general), tol.qk_coefficient(T, H, dtype, masked=general)),
                lambda i, j: s_masked[bi, ni, i, j],
                lambda i, j: jnp.where(attended(i, j), jnp.sum(qf[bi, i, ni] * kf[bi, j, ni // G], -1) * scale, 0.0),
                OPS)
            located["scores"] = localization.indices(loc, OPS)
        rows = _rows(found, results, "qk_row", "qk_col", granularity, T, loc) if acts else None
        affected.append(rows)
        if correct:
            if loc is not None:
                s = s.at[bi, ni, loc.i, loc.j].set(jnp.where(loc.ok, loc.value, s[bi, ni, loc.i, loc.j]))
                corrected += _count(loc.ok)
                rows = rows & ~loc.ok[..., None]
            redo = lambda s: jnp.where(  # noqa: E731  a real recomputation: the barrier stops CSE
                rows[..., None], _scores(*lax.optimization_barrier((qg, key)), scale, prec), s)
            s = lax.cond(jnp.any(rows), redo, lambda s: s, s)
            corrected += _count(rows)
    logits = s if bias is None else s + bias.astype(s.dtype).reshape((1,) * (4 - bias.ndim) + bias.shape)
    s_soft = logits if allowed_ts is None else jnp.where(allowed_ts, logits, NEG)
    # probabilities outside `keep` are zero: the masked entries, or (empty="uniform",
    # jax.nn's rule) only the rows beyond the query length
    keep = allowed_ts if empty == "zero" else masking.live(T, query_lengths, OPS)

    # ---- P = softmax(S), twice under DMR (a third evaluation votes), its exponential checksum
    p, lse = _softmax(s_soft, keep, guard, stats=True)
    p = faults.inject(p, "probs", "BNTS", plan)
    lse_check = None
    if "softmax_exp" in wanted:
        p = lax.optimization_barrier(p)  # the checksum and P·V read the same P, not two fusions of it
    if "softmax_dmr" in wanted:
        p_replica, lse_check = _softmax_replica(s_soft, keep, guard)
        p_replica = faults.inject(p_replica, "probs", "BNTS", plan, replica=1)
        found["softmax_dmr"] = abft.softmax_dmr(
            p, p_replica, _logit_magnitude(s, logits, allowed_ts, p, p_replica))
    if "softmax_exp" in wanted:
        ratio, ones, lse_exp = abft.softmax_exp(p, s_soft, None if bias is None else s, keep, dtype, with_lse=True)
        found["softmax_exp"] = (ratio, ones)
        lse_check = lse_exp if lse_check is None else lse_check
    judge(SOFTMAX)
    flagged = {c: _rows(found, results, c, "", granularity, T, None) for c in SOFTMAX if c in found and acts}
    affected.extend(flagged.values())
    if correct and flagged:
        def fix(p):
            # a real recomputation (the barrier stops CSE); a DMR mismatch is replaced only where
            # it votes against p, a row the exponential checksum flags in any case
            p3 = _softmax(lax.optimization_barrier(s_soft), keep, guard)
            replace = flagged.get("softmax_exp", jnp.zeros((B, N, T), bool))
            if "softmax_dmr" in flagged:
                replace = replace | flagged["softmax_dmr"] & ~(
                    jnp.abs(p - p3).sum(-1) <= found["softmax_dmr"][1])
            return jnp.where(replace[..., None], p3, p), _count(replace)

        rows = functools.reduce(jnp.logical_or, flagged.values())
        p, n = lax.cond(jnp.any(rows), fix, lambda p: (p, jnp.zeros((), jnp.int32)), p)
        corrected += n

    # ---- O = P·V: inject, check, locate, repair
    p_mma = p.astype(query.dtype).reshape(B, K, G, T, S)
    pv = {"pv_row", "pv_col"} & set(wanted)
    if pv:
        p_mma = lax.optimization_barrier(p_mma)  # the GEMM and the predictions read the same P̂
    o = _outputs(p_mma, value, prec)
    o = faults.inject(o.reshape(B, T, N, H), "out", "BTNH", plan)
    if pv:
        o5 = o.reshape(B, T, K, G, H)
        if "pv_row" in wanted:
            found["pv_row"] = abft.pv_row(o5, p_mma, value, dtype)
        if "pv_col" in wanted:
            found["pv_col"] = abft.pv_col(o5, p_mma, value, dtype)
        judge(("pv_row", "pv_col"))
        loc = None
        if "pv_row" in found and "pv_col" in found and granularity == "vector":
            wd = _working(value.dtype)
            pf, vt = p_mma.reshape(B, N, T, S).astype(wd), jnp.moveaxis(value.astype(wd), 1, -1)  # vt: B K H S
            loc = localization.locate(
                found["pv_row"], found["pv_col"],
                (tol.pv_coefficient(S, H, dtype), tol.pv_col_coefficient(T, S, dtype)),
                lambda i, h: o[bi, i, ni, h],
                lambda i, h: jnp.sum(pf[bi, ni, i] * vt[bi, ni // G, h], -1), OPS)
            located["out"] = localization.indices(loc, OPS)
        rows = _rows(found, results, "pv_row", "pv_col", granularity, T, loc) if acts else None
        affected.append(rows)
        if correct:
            if loc is not None:
                o = o.at[bi, loc.i, ni, loc.j].set(jnp.where(loc.ok, loc.value, o[bi, loc.i, ni, loc.j]))
                corrected += _count(loc.ok)
                rows = rows & ~loc.ok[..., None]
            redo = lambda o: jnp.where(  # noqa: E731
                jnp.swapaxes(rows, 1, 2)[..., None],
                _outputs(*lax.optimization_barrier((p_mma, value)), prec).reshape(B, T, N, H), o)
            o = lax.cond(jnp.any(rows), redo, lambda o: o, o)
            corrected += _count(rows)

    detected = jnp.zeros((), bool)
    for r in results.values():
        detected = detected | jnp.any(r.flagged)
    out = o.astype(query.dtype)
    if on_fault == "nan" and affected:
        poison = functools.reduce(jnp.logical_or, affected)  # B N T
        out = jnp.where(jnp.swapaxes(poison, 1, 2)[..., None], jnp.asarray(jnp.nan, out.dtype), out)
    results = {name: results[name] for name in wanted}
    report = make_report(detected=detected, checks=results, inputs_finite=finite, located=located,
                         corrected=corrected)
    if stats:
        live = jnp.isfinite(lse)[..., None] if keep is None else keep
        mu = jnp.max(jnp.where(live & jnp.isfinite(logits), jnp.abs(logits), 0.0), axis=-1)
        return Block(o.reshape(B, T, N, H), lse, lse_check, mu), report
    return out, report
