"""The backward of ring attention (``ftattn_torch.ring``), by recomputation around the ring.

Each rank keeps its query chunk, its part of the output and the global log-sum-exp of its rows
(the forward's merged one), and sends its key and value chunk around the ring again, now with two
accumulators beside it, ``dK`` and ``dV`` of that chunk. At each step it recomputes the block's
probabilities from the global log-sum-exp, ``P = exp(scale·QKᵀ − lse)``, adds its share

    dV_j += Pᵀ dO,   dS = P ∘ (dO Vⱼᵀ − D),   dQ += scale · dS Kⱼ,   dK_j += scale · dSᵀ Q

with ``D = rowsum(dO ∘ O)``, and passes chunk and accumulators on. After the P steps, one more
exchange returns each chunk's accumulators to the rank that owns it. Memory per step is one
``(B, N, Tc, Sc)`` block, like the forward's; the backward is not checked.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _expand(x: torch.Tensor, N: int) -> torch.Tensor:
    """``(B, K, S, H)`` to ``(B, N, S, H)``: each kv head serves ``N // K`` query heads."""
    return x.repeat_interleave(N // x.shape[1], dim=1)


def _fold(x: torch.Tensor, K: int) -> torch.Tensor:
    """``(B, N, S, H)`` to ``(B, K, S, H)``: the sum over each kv head's query heads."""
    B, N, S, H = x.shape
    return x.view(B, K, N // K, S, H).sum(2)


def backward(query, key, value, out, lse, grad_out, *, scale: float, is_causal: bool, me: int, P: int,
             exchange: Callable[[list[torch.Tensor]], list[torch.Tensor]]):
    """``(dQ, dK, dV)`` of this rank's chunks, in their dtypes.

    query, out, grad_out: ``(B, N, Tc, H)``; key, value: ``(B, K, Sc, H)``; lse: float32 or
    float64 ``(B, N, Tc)``, the forward's merged log-sum-exp (−inf on a row that attends to
    nothing); ``exchange(tensors)`` sends to rank ``me + 1`` and returns what rank ``me − 1`` sent.
    """
    w = torch.float64 if query.dtype == torch.float64 else torch.float32
    B, N, Tc, H = query.shape
    K, Sc = key.shape[1], key.shape[2]
    q, do = query.to(w), grad_out.to(w)
    lse = lse.to(w)
    live = torch.isfinite(lse)
    lse = torch.where(live, lse, 0.0)
    d = (do * out.to(w)).sum(-1, keepdim=True)  # B N Tc 1
    dq = torch.zeros_like(q)
    kr, vr = key, value
    dk = torch.zeros(B, K, Sc, H, dtype=w, device=query.device)
    dv = torch.zeros_like(dk)
    for r in range(P):
        j = (me - r) % P  # the rank whose chunk is here
        if not (is_causal and j > me):
            k, v = _expand(kr.to(w), N), _expand(vr.to(w), N)
            s = scale * q @ k.transpose(-1, -2)
            keep = live[..., None]
            if is_causal and j == me:
                keep = keep & torch.ones(Tc, Sc, dtype=torch.bool, device=q.device).tril()
            p = torch.where(keep, (s - lse[..., None]).exp(), 0.0)
            ds = p * (do @ v.transpose(-1, -2) - d)
            dq += scale * ds @ k
            dk += _fold(scale * ds.transpose(-1, -2) @ q, K)
            dv += _fold(p.transpose(-1, -2) @ do, K)
        if r < P - 1:
            kr, vr, dk, dv = exchange([kr, vr, dk, dv])
    if P > 1:  # the accumulators here belong to rank me + 1; ours are on rank me − 1
        dk, dv = exchange([dk, dv])
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)


__all__ = ["backward"]
