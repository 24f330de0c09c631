"""The unfused schemes in eager PyTorch: S = scale·QKᵀ, softmax (optionally twice),
O = P·V, and the checks. ``api.attention`` validates and calls :func:`run`."""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ftattn_spec import tolerances as tol
from ftattn_spec.report import make_report

from ftattn_spec import localization, masking

from .. import faults
from ..common import ops as ops_on
from ..common import verdict
from . import checks as abft

F32 = torch.float32
SOFTMAX = ("softmax_dmr", "softmax_exp")  # the checks of P, judged as unsigned per-row values
NEG = abft.NEG  # masked logits: large, finite, so no row is NaN
LOG2E = abft.LOG2E


def _bmm_f32(a: Tensor, b: Tensor) -> Tensor:
    """Batched a @ b with float32 accumulation and a float32 result.

    On CUDA, float16/bfloat16 operands go to the tensor cores with a float32
    output (``out_dtype``, which autograd cannot differentiate); elsewhere, and
    when a gradient is needed, the operands are upcast, which is exact.
    Either way the products are exact and the sums are float32. float64
    operands stay float64.
    """
    if a.dtype == torch.float64:  # float64 inputs are computed in float64
        return torch.bmm(a, b.to(torch.float64))
    grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)  # out_dtype has no derivative
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and not grad:
        return torch.bmm(a, b, out_dtype=F32)
    return torch.bmm(a.to(F32), b.to(F32))


def uses_tf32(x: Tensor) -> bool:
    """Whether float32 matrix products on ``x``'s device may run at TF32 precision."""
    return x.is_cuda and torch.get_float32_matmul_precision() != "highest"


def _lse(m, d) -> Float[Tensor, "B N T"]:
    """A row's natural log-sum-exp ``m + ln d``; −inf for a row with nothing attended (``d = 0``)."""
    return torch.where(d > 0, m + torch.where(d > 0, d, 1.0).log(), -torch.inf)[..., 0]


def _softmax(l: Float[Tensor, "B N T S"], keep, guard: bool, stats: bool = False):
    """Replica 1: PyTorch's softmax (masked logits hold NEG, whose exp is 0); with ``stats``,
    also the row's log-sum-exp from the same maximum and row sum.

    ``guard`` (any mask or bias): zero outside ``keep``, and a row with no kept
    entry or only -inf logits gives zeros instead of NaN.
    """
    if not guard and not stats:
        return torch.softmax(l, dim=-1)
    m = l.amax(-1, keepdim=True).detach()
    m = m.masked_fill(m == -torch.inf, 0.0)
    z = (l - m).exp()
    if keep is not None:
        z = z.masked_fill(~keep, 0.0)
    d = z.sum(-1, keepdim=True)
    p = z / torch.where(d > 0, d, 1.0)
    return (p, _lse(m, d)) if stats else p


def _softmax_replica(l: Float[Tensor, "B N T S"], keep, guard: bool):
    """Replica 2: an independent evaluation with a different formula (base-2
    exponential of the rescaled argument, a two-level sum, product with the
    reciprocal sum), and the row's log-sum-exp from its own row sum."""
    m = l.amax(-1, keepdim=True)
    if guard:
        m = m.masked_fill(m == -torch.inf, 0.0)
    z = (l - m).mul_(LOG2E).exp2_()
    if keep is not None:
        z.masked_fill_(~keep, 0.0)
    d = abft.blocked_sum(z, -1)[..., None]
    return z.mul_(1.0 / (torch.where(d > 0, d, 1.0) if guard else d)), _lse(m, d)


def _logit_magnitude(s, s_soft, biased: bool, attended, p, p_replica) -> Float[Tensor, "B N T"]:
    """``μ_i`` of ``tol.dmr_logit_coefficient``: the largest ``max(|s_ij|, |l_ij|)``
    over the attended entries where either replica's probability is nonzero
    (``s_soft`` holds the logits there)."""
    mag = s_soft.abs()
    if biased:
        mag = torch.maximum(mag, s.abs())
    live = (p != 0) | (p_replica != 0)
    if attended is not None:
        live = live & attended
    return torch.where(live, mag, 0.0).amax(-1)


def _scores(qg: Float[Tensor, "B K G T H"], key: Float[Tensor, "B K S H"], scale: float) -> Float[Tensor, "B N T S"]:
    B, K, G, T, H = qg.shape
    S = key.shape[2]
    s = _bmm_f32(qg.reshape(B * K, G * T, H), key.reshape(B * K, S, H).transpose(1, 2))
    return s.reshape(B, K * G, T, S).mul_(scale)


def _rows(found: dict, results: dict, row: str, col: str, granularity: str, n_rows: int, located):
    """Rows (``B N T``) implicated by a stage's checks, or None if it runs none."""
    names = [c for c in (row, col) if c in found]
    if not names:
        return None
    if granularity == "global":
        head = results[names[0]].flagged
        for c in names[1:]:
            head = head | results[c].flagged
        return head[..., None].expand(*head.shape, n_rows)
    ops = ops_on(found[names[0]][0].device)
    get = lambda c: localization.flags(*found[c], ops) if c in found else None  # noqa: E731
    return localization.affected_rows(get(row), get(col), n_rows, located, ops)


def _repair(x: Float[Tensor, "B N T C"], located, rows: Bool[Tensor, "B N T"], recompute) -> Tensor:
    """In place, under no_grad: replace located elements of ``x`` by their recomputed
    values, then recompute the remaining implicated rows (``recompute()`` gives all
    of ``x`` afresh; called only if a row needs it). Returns the repair count."""
    count = torch.zeros((), dtype=torch.int32, device=x.device)
    if located is not None:
        bi = torch.arange(x.shape[0], device=x.device)[:, None]
        ni = torch.arange(x.shape[1], device=x.device)[None, :]
        x[bi, ni, located.i, located.j] = torch.where(located.ok, located.value, x[bi, ni, located.i, located.j])
        count += located.ok.sum(dtype=torch.int32)
        rows = rows & ~located.ok[..., None]
    if rows.any():
        x.copy_(torch.where(rows[..., None], recompute(), x))
        count += rows.sum(dtype=torch.int32)
    return count


def _attended(full, bi, ni, i, j, value: Tensor) -> Tensor:
    """``value`` where (i, j) is attended, 0 where it is masked (``full`` is None: nothing is)."""
    return value if full is None else torch.where(full[bi, ni, i, j], value, 0.0)


class Block(NamedTuple):
    """One block of a ring (:func:`block`): the output in the working precision, and per row
    (``B N T``) the log-sum-exp, a second one evaluated apart (the DMR replica's, else the
    exponential checksum's; None when the scheme checks no softmax), and the row's logit
    magnitude μ (``ftattn_spec.ring.lse_threshold``)."""

    out: Tensor
    lse: Tensor
    lse_check: Tensor | None
    mu: Tensor


def block(query, key, value, plan, *, checks: tuple[str, ...], scale: float, is_causal: bool):
    """One block of ring attention: ``(Block, Report)``; vector granularity, no repair."""
    return run(query, key, value, checks=checks, granularity="vector", scale=scale, is_causal=is_causal,
               plan=plan, stats=True)


def run(query: Float[Tensor, "B N T H"], key: Float[Tensor, "B K S H"], value: Float[Tensor, "B K S H"], *,
        checks: tuple[str, ...], granularity: str, scale: float, is_causal: bool, on_fault: str = "report", plan=None,
        bias=None, mask=None, query_lengths=None, key_lengths=None, window=None, empty: str = "zero",
        stats: bool = False):
    """Run ``checks`` (a scheme's, in ``CHECKS`` order); ``plan`` is a validated ``FaultPlan`` or None.

    The mask arguments are those of ``ftattn_spec.masking`` (validated);
    ``empty`` says how a fully masked row is filled (``"zero"`` or ``"uniform"``).
    ``stats``: return ``(Block, Report)`` instead (:func:`block`).
    """
    dev = query.device
    with torch.no_grad():
        finite = torch.isfinite(query).all() & torch.isfinite(key).all() & torch.isfinite(value).all()
    query = faults.inject(query, "query", "BNTH", plan)
    key = faults.inject(key, "key", "BKSH", plan)
    value = faults.inject(value, "value", "BKSH", plan)
    B, N, T, H = query.shape
    K, S = key.shape[1], key.shape[2]
    G = N // K
    dtype = str(query.dtype).removeprefix("torch.")
    W = torch.float64 if query.dtype == torch.float64 else F32  # the working precision
    wanted = checks
    tf32 = uses_tf32(query)
    correct = on_fault == "correct"
    acts = on_fault in ("correct", "nan")  # only these need the implicated rows
    bi, ni = torch.arange(B, device=dev)[:, None], torch.arange(N, device=dev)[None, :]
    found, results, located, affected = {}, {}, {}, []
    corrected = torch.zeros((), dtype=torch.int32, device=dev)

    def judge(names):
        for name in names:
            if name in wanted:
                results[name] = verdict(*found[name], granularity, signed=name not in SOFTMAX,
                                        ratio=(name == "softmax_exp"))

    # ---- S = scale·QKᵀ: inject, check, locate, repair
    qg = query.reshape(B, K, G, T, H)
    s = faults.inject(_scores(qg, key, scale), "scores", "BNTS", plan)
    allowed = masking.combine(B, T, S, ops_on(dev), mask=mask, is_causal=is_causal, window=window,
                                query_lengths=query_lengths, key_lengths=key_lengths)
    allowed_ts = masking.attended(allowed, is_causal, T, S, ops_on(dev))  # None or B|1 N|1 T S
    guard = allowed is not None or bias is not None
    if {"qk_row", "qk_col"} & set(wanted):
        with torch.no_grad():  # the checks never need a backward graph
            # masked entries are excluded from the checksums (0) and from the softmax (NEG)
            s_masked = s if allowed_ts is None else torch.where(allowed_ts, s, 0.0)
            if "qk_row" in wanted:
                found["qk_row"] = abft.qk_row(qg, key, s_masked, scale, is_causal, dtype, tf32, allowed)
            if "qk_col" in wanted:
                found["qk_col"] = abft.qk_col(qg, key, s_masked, scale, is_causal, dtype, tf32, allowed)
            judge(("qk_row", "qk_col"))
            loc = None
            if "qk_row" in found and "qk_col" in found and granularity == "vector":
                qf, kf = query.detach().to(W), key.detach().to(W)
                general = allowed is not None
                full = None if allowed_ts is None else allowed_ts.expand(B, N, T, S)
                loc = localization.locate(
                    found["qk_row"], found["qk_col"],
                    (tol.qk_coefficient(S, H, dtype, tf32, masked=general),
                     tol.qk_coefficient(T, H, dtype, tf32, masked=general)),
                    lambda i, j: s_masked[bi, ni, i, j],
                    lambda i, j: _attended(full, bi, ni, i, j, (qf[bi, ni, i] * kf[bi, ni // G, j]).sum(-1) * scale),
                    ops_on(dev))
                located["scores"] = localization.indices(loc, ops_on(dev))
            del s_masked
            rows = _rows(found, results, "qk_row", "qk_col", granularity, T, loc) if acts else None
            affected.append(rows)
            # Repairs write into S under no_grad: S is not saved for backward,
            # and the gradient is that of the clean S the repair restores.
            if correct:
                corrected += _repair(s, loc, rows, lambda: _scores(qg, key, scale))
    logits = s if bias is None else s + bias.to(W).reshape((1,) * (4 - bias.ndim) + tuple(bias.shape))
    # s itself is not needed again
    s_soft = logits if allowed_ts is None else logits.masked_fill_(~allowed_ts, NEG)
    # probabilities outside `keep` are zero: the masked entries, or (empty="uniform",
    # jax.nn's rule) only the rows beyond the query length
    keep = allowed_ts if empty == "zero" else masking.live(T, query_lengths, ops_on(dev))

    # ---- P = softmax(S), twice under DMR (a third evaluation votes), its exponential checksum
    if stats:
        p, lse = _softmax(s_soft, keep, guard, stats=True)
        with torch.no_grad():
            live = lse.isfinite()[..., None] if keep is None else keep
            mu_row = torch.where(live & s_soft.isfinite(), s_soft.abs(), 0.0).amax(-1)
    else:
        p, lse = _softmax(s_soft, keep, guard), None
    p = faults.inject(p, "probs", "BNTS", plan)
    flagged, lse_check = {}, None
    if set(SOFTMAX) & set(wanted):
        with torch.no_grad():
            if "softmax_dmr" in wanted:
                p_replica, lse_check = _softmax_replica(s_soft, keep, guard)
                p_replica = faults.inject(p_replica, "probs", "BNTS", plan, replica=1)
                mu = _logit_magnitude(s, s_soft, bias is not None, allowed_ts, p, p_replica)
                found["softmax_dmr"] = abft.softmax_dmr(p, p_replica, mu)
                del p_replica
            if "softmax_exp" in wanted:
                ratio, ones, lse_exp = abft.softmax_exp(p, s_soft, None if bias is None else s, keep, dtype,
                                                        with_lse=True)
                found["softmax_exp"] = (ratio, ones)
                lse_check = lse_exp if lse_check is None else lse_check
            judge(SOFTMAX)
            if acts:
                flagged = {c: _rows(found, results, c, "", granularity, T, None) for c in SOFTMAX if c in found}
            affected.extend(flagged.values())
            fix = correct and any(bool(rows.any()) for rows in flagged.values())
        if fix:
            # a DMR mismatch is replaced only where the third evaluation votes against p, a row
            # the exponential checksum flags in any case
            p3 = _softmax(s_soft, keep, guard)  # with autograd: replaced rows get their gradient through it
            with torch.no_grad():
                replace = flagged.get("softmax_exp", torch.zeros((B, N, T), dtype=torch.bool, device=dev))
                if "softmax_dmr" in flagged:
                    replace = replace | flagged["softmax_dmr"] & ~(
                        (p - p3).abs().sum(-1) <= found["softmax_dmr"][1])
                corrected += replace.sum(dtype=torch.int32)
            p = torch.where(replace[..., None], p3, p)
            del p3

    s = s_soft = logits = None  # autograd keeps what it needs; free the rest early
    p_mma = p.to(query.dtype).reshape(B * K, G * T, S)
    del p
    o = _bmm_f32(p_mma, value.reshape(B * K, S, H))  # BK GT H
    o = faults.inject(o.reshape(B, N, T, H), "out", "BNTH", plan).reshape(B * K, G * T, H)
    with torch.no_grad():
        if {"pv_row", "pv_col"} & set(wanted):
            if "pv_row" in wanted:
                found["pv_row"] = abft.pv_row(o, p_mma, value, N, dtype, tf32)
            if "pv_col" in wanted:
                found["pv_col"] = abft.pv_col(o, p_mma, value, N, dtype, tf32)
            judge(("pv_row", "pv_col"))
            o4 = o.view(B, N, T, H)
            loc = None
            if "pv_row" in found and "pv_col" in found and granularity == "vector":
                pn, vt = p_mma.view(B, N, T, S), value.detach().to(W).transpose(-1, -2)  # vt: B K H S
                loc = localization.locate(
                    found["pv_row"], found["pv_col"],
                    (tol.pv_coefficient(S, H, dtype, tf32), tol.pv_col_coefficient(T, S, dtype, tf32)),
                    lambda i, h: o4[bi, ni, i, h],
                    lambda i, h: (pn[bi, ni, i].to(W) * vt[bi, ni // G, h]).sum(-1), ops_on(dev))
                located["out"] = localization.indices(loc, ops_on(dev))
            rows = _rows(found, results, "pv_row", "pv_col", granularity, T, loc) if acts else None
            affected.append(rows)
            if correct:
                corrected += _repair(o4, loc, rows,
                                     lambda: _bmm_f32(p_mma, value.reshape(B * K, S, H)).view(B, N, T, H))
        detected = torch.zeros((), dtype=torch.bool, device=dev)
        for r in results.values():
            detected = detected | r.flagged.any()
    out = o.reshape(B, N, T, H).to(query.dtype)
    if on_fault == "nan" and affected:
        poison = affected[0]
        for rows in affected[1:]:
            poison = poison | rows
        out = out.masked_fill(poison[..., None], float("nan"))
    results = {name: results[name] for name in wanted}
    report = make_report(detected=detected, checks=results, inputs_finite=finite, located=located,
                         corrected=corrected)
    if stats:
        return Block(o.reshape(B, N, T, H), lse, lse_check, mu_row), report
    return out, report
