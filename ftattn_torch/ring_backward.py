"""The backward of ring attention (``ftattn_torch.ring``), by recomputation around the ring, checked.

Each rank keeps its query chunk, its part of the output and the global log-sum-exp of its rows
(the forward's merged one), and sends its key and value chunk around the ring again, now with two
accumulators beside it, ``dK`` and ``dV`` of that chunk. At each step it recomputes the block's
probabilities from the global log-sum-exp, ``P = exp(scale·QKᵀ − lse)``, adds its share

    dV_j += Pᵀ dO,   dS = P ∘ (dO Vⱼᵀ − D),   dQ += scale · dS Kⱼ,   dK_j += scale · dSᵀ Q

with ``D = rowsum(dO ∘ O)``, and passes chunk and accumulators on. After the P steps, one more
exchange returns each chunk's accumulators to the rank that owns it. Memory per step is one
``(B, N, Tc, Sc)`` block, like the forward's.

With ``checked``, every product is checked against a checksum and the softmax's row sums against 1
(``ftattn_spec.ring_backward``); the accumulators travel with their row sums, so a gradient
corrupted between ranks is seen too. Per-key verdicts travel with the chunk and come home with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from ftattn_spec import ring as spec_ring
from ftattn_spec import ring_backward as rb

from . import faults


class BackwardChecks(NamedTuple):
    """One rank's verdicts, before the ring's all-reduce: worst ratio (residual over threshold) per
    check, ``(B, N, Tc)`` for ``rb.ROW_CHECKS`` and ``(B, K, Sc)`` of this rank's own keys for
    ``rb.KEY_CHECKS``; ``steps`` bool ``(P,)``: which of this rank's steps flagged."""

    ratios: dict
    steps: torch.Tensor
    finite: torch.Tensor  # bool scalar on the device (no host sync)


def _expand(x: torch.Tensor, N: int) -> torch.Tensor:
    """``(B, K, S, H)`` to ``(B, N, S, H)``: each kv head serves ``N // K`` query heads."""
    return x.repeat_interleave(N // x.shape[1], dim=1)


def _fold(x: torch.Tensor, K: int) -> torch.Tensor:
    """``(B, N, S, ...)`` to ``(B, K, S, ...)``: the sum over each kv head's query heads."""
    B, N = x.shape[:2]
    return x.view(B, K, N // K, *x.shape[2:]).sum(2)


def _ratio(residual: torch.Tensor, threshold) -> torch.Tensor:
    """Residual over threshold; NaN (a non-finite residual or threshold) fails every comparison."""
    return torch.where(torch.isfinite(threshold), residual.abs() / threshold, torch.nan)


def _worst(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    """Elementwise worse of two ratio arrays; NaN wins."""
    if a is None:
        return b
    return torch.where(torch.isnan(a) | torch.isnan(b), torch.nan, torch.maximum(a, b))


def _bad(ratio: torch.Tensor) -> torch.Tensor:
    return ~(ratio <= 1.0)


def _transit(dk, dv, carried, H: int, P: int) -> torch.Tensor:
    """``bwd_transit``: the worse of dK's and dV's row sums against the checksums that travel
    with them (``carried``: Σₕ and Σₕ|·| of the contributions, for dK then dV)."""
    one = lambda acc, c, a: _ratio(acc.sum(-1) - c, rb.transit_threshold(H, P, a))  # noqa: E731
    return _worst(one(dk, *carried[:2]), one(dv, *carried[2:]))


def _carry(carried, dk_step, dv_step):
    """The travelling checksums with one step's contributions to dK and dV added."""
    return [carried[0] + dk_step.sum(-1), carried[1] + dk_step.abs().sum(-1),
            carried[2] + dv_step.sum(-1), carried[3] + dv_step.abs().sum(-1)]


def _send(kr, vr, dk, dv, carried, kworst, *, plan, me: int, r: int, P: int, exchange, checked: bool):
    """The end of step ``r``: the plan's accumulator faults of that step injected, then the chunk
    and its accumulators (with their checksums and per-key ratios when ``checked``) sent to rank
    ``me + 1``; after the last step only the accumulators, which go home (their owner is
    ``me + 1``). Returns ``(kr, vr, dk, dv, carried, kworst)`` as received."""
    dk = faults.inject_ring(dk, plan, me, r, "bwd_dk_acc")
    dv = faults.inject_ring(dv, plan, me, r, "bwd_dv_acc")
    if P == 1:
        return kr, vr, dk, dv, carried, kworst
    chunk = [kr, vr] if r < P - 1 else []
    got = exchange([*chunk, dk, dv, *carried, kworst] if checked else [*chunk, dk, dv])
    if chunk:
        kr, vr, got = got[0], got[1], got[2:]
    if checked:
        carried, kworst = got[2:6], got[6]
    return kr, vr, got[0], got[1], carried, kworst


def backward(query, key, value, out, lse, grad_out, *, scale: float, is_causal: bool, me: int, P: int,
             exchange: Callable[[list[torch.Tensor]], list[torch.Tensor]], checked: bool = False, plan=None,
             u: float = rb.unit("float32")):
    """``(dQ, dK, dV, checks)`` of this rank's chunks, in their dtypes; ``checks`` a
    :class:`BackwardChecks` (None without ``checked``).

    query, out, grad_out: ``(B, N, Tc, H)``; key, value: ``(B, K, Sc, H)``; lse: float32 or
    float64 ``(B, N, Tc)``, the forward's merged log-sum-exp (−inf on a row that attends to
    nothing); ``exchange(tensors)`` sends to rank ``me + 1`` and returns what rank ``me − 1`` sent.
    ``plan``: a ``ftattn_spec.ring.RingPlan`` whose backward sites are injected here; ``u`` the
    unit roundoff of the products (``ftattn_spec.ring_backward.unit``).
    """
    w = torch.float64 if query.dtype == torch.float64 else torch.float32
    B, N, Tc, H = query.shape
    K, Sc = key.shape[1], key.shape[2]
    dev = query.device
    q, do = query.to(w), grad_out.to(w)
    lse = lse.to(w)
    live = torch.isfinite(lse)
    lse = torch.where(live, lse, 0.0)
    d = (do * out.to(w)).sum(-1, keepdim=True)  # B N Tc 1
    dq = torch.zeros_like(q)
    kr, vr = key, value
    dk = torch.zeros(B, K, Sc, H, dtype=w, device=dev)
    dv = torch.zeros_like(dk)
    # the travelling checksums of dK and dV (Σ_h, and Σ_h |·| of the contributions) and the
    # worst per-key ratios of bwd_dk, bwd_dv, bwd_transit for the chunk's keys
    carried = [torch.zeros(B, K, Sc, dtype=w, device=dev) for _ in range(4)]
    kworst = torch.zeros(3, B, K, Sc, dtype=w, device=dev)
    rows: dict[str, torch.Tensor | None] = {c: None for c in rb.ROW_CHECKS[:-1]}
    psum = torch.zeros(B, N, Tc, dtype=w, device=dev)
    mu = torch.zeros_like(psum)
    argerr = torch.zeros_like(psum)
    steps = torch.zeros(P, dtype=torch.bool, device=dev)
    q_abs, q_sum = q.abs().sum(-1), q.sum(-1)  # B N Tc
    do_abs, do_sum = do.abs().sum(-1), do.sum(-1)

    for r in range(P):
        j = (me - r) % P  # the rank whose chunk is here
        if checked and r > 0:  # the accumulators as received
            t = _transit(dk, dv, carried, H, P)
            kworst[2] = _worst(kworst[2], t)
            steps[r] |= _bad(t).any()
        if not (is_causal and j > me):
            k, v = _expand(kr.to(w), N), _expand(vr.to(w), N)
            a = faults.inject_ring(q @ k.transpose(-1, -2), plan, me, r, "bwd_scores")
            s = scale * a
            keep = live[..., None]
            if is_causal and j == me:
                keep = keep & torch.ones(Tc, Sc, dtype=torch.bool, device=dev).tril()
            p = faults.inject_ring(torch.where(keep, (s - lse[..., None]).exp(), 0.0), plan, me, r, "bwd_probs")
            dp = faults.inject_ring(do @ v.transpose(-1, -2), plan, me, r, "bwd_dp")
            ds = faults.inject_ring(p * (dp - d), plan, me, r, "bwd_ds")
            g = faults.inject_ring(ds @ k, plan, me, r, "bwd_dq")
            gk = faults.inject_ring(_fold(ds.transpose(-1, -2) @ q, K), plan, me, r, "bwd_dk")
            gv = faults.inject_ring(_fold(p.transpose(-1, -2) @ do, K), plan, me, r, "bwd_dv")
            if checked:
                k_abs = k.abs()
                ka_rows = k_abs.sum(-1)  # B N Sc
                new = {
                    "bwd_qk_row": _ratio(a.sum(-1) - (q * k.sum(2)[:, :, None]).sum(-1),
                                         rb.product_threshold(H, Sc, (q.abs() * k_abs.sum(2)[:, :, None]).sum(-1), u)),
                    "bwd_dp_row": _ratio(dp.sum(-1) - (do * v.sum(2)[:, :, None]).sum(-1),
                                         rb.product_threshold(H, Sc, (do.abs() * v.abs().sum(2)[:, :, None]).sum(-1),
                                                              u)),
                    "bwd_ds": _ratio(ds.sum(-1) - ((p * dp).sum(-1) - d[..., 0] * p.sum(-1)),
                                     rb.ds_threshold(Sc, (p * (dp.abs() + d.abs())).sum(-1))),
                    "bwd_dq": _ratio(g.sum(-1) - (ds @ k.sum(-1)[..., None])[..., 0],
                                     rb.product_threshold(Sc, H, (ds.abs() @ ka_rows[..., None])[..., 0], u)),
                }
                for name, ratio in new.items():
                    rows[name] = _worst(rows[name], ratio)
                    steps[r] |= _bad(ratio).any()
                psum += p.sum(-1)
                mu = torch.maximum(mu, torch.where(keep, s.abs(), 0.0).amax(-1))
                argerr = torch.maximum(argerr, rb.argument_error(H, scale, q_abs, k_abs.amax((-1, -2))[..., None], u))
                dsT = ds.transpose(-1, -2)
                kr_dk = _ratio(gk.sum(-1) - _fold((dsT @ q_sum[..., None])[..., 0], K),
                               rb.product_threshold(Tc + N // K, H, _fold((dsT.abs() @ q_abs[..., None])[..., 0], K),
                                                    u))
                pT = p.transpose(-1, -2)
                kr_dv = _ratio(gv.sum(-1) - _fold((pT @ do_sum[..., None])[..., 0], K),
                               rb.product_threshold(Tc + N // K, H, _fold((pT @ do_abs[..., None])[..., 0], K), u))
                kworst[0], kworst[1] = _worst(kworst[0], kr_dk), _worst(kworst[1], kr_dv)
                steps[r] |= _bad(kr_dk).any() | _bad(kr_dv).any()
                carried = _carry(carried, scale * gk, gv)
            dq += scale * g
            dk += scale * gk
            dv += gv
        kr, vr, dk, dv, carried, kworst = _send(kr, vr, dk, dv, carried, kworst, plan=plan, me=me, r=r, P=P,
                                                exchange=exchange, checked=checked)
    result = None
    if checked:  # home: the accumulators against their checksums, and the softmax's row sums
        t = _transit(dk, dv, carried, H, P)
        kworst[2] = _worst(kworst[2], t)
        steps[P - 1] |= _bad(t).any()
        S = Sc * P
        lse_error = spec_ring.lse_threshold(S, mu) + P * spec_ring.weight_threshold(lse.abs())
        thr = rb.softmax_threshold(S, argerr, mu, lse.abs(), lse_error, psum.clamp_min(1.0))
        soft = _ratio(psum - live.to(w), thr)
        steps[P - 1] |= _bad(soft).any()
        zero = torch.zeros(B, N, Tc, dtype=w, device=dev)
        ratios = {**{n: zero if x is None else x for n, x in rows.items()}, "bwd_softmax": soft,
                  **dict(zip(rb.KEY_CHECKS, kworst))}
        result = BackwardChecks(ratios, steps, grad_out.isfinite().all())
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype), result


__all__ = ["backward", "BackwardChecks"]
