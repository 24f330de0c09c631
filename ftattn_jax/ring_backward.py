"""The backward of ring attention (``ftattn_jax.sharding``), by recomputation around the ring.

Each device keeps its query chunk, its part of the output (working precision) and the global
log-sum-exp of its rows (the forward's merged one), and passes its key and value chunk around the
ring again with ``lax.ppermute``, now with two accumulators beside it, ``dK`` and ``dV`` of that
chunk. At each step it recomputes the block's probabilities from the global log-sum-exp,
``P = exp(scale·QKᵀ − lse)``, adds its share

    dV_j += Pᵀ dO,   dS = P ∘ (dO Vⱼᵀ − D),   dQ += scale · dS Kⱼ,   dK_j += scale · dSᵀ Q

with ``D = rowsum(dO ∘ O)``, and passes chunk and accumulators on; one more ``ppermute`` returns
each chunk's accumulators to its device. Memory per step is one ``(B, N, Tc, Sc)`` block, as in
the forward, whatever computed the forward's blocks; the backward is not checked.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def backward(query, key, value, out, lse, grad_out, *, scale: float, is_causal: bool, axis_name, axis_size: int):
    """``(dQ, dK, dV)`` of this device's chunks, in their dtypes (inside ``shard_map`` or a
    ``vmap`` over ``axis_name``).

    query, out, grad_out: ``(B, Tc, N, H)``; key, value: ``(B, Sc, K, H)``; lse: ``(B, N, Tc)``,
    the forward's merged log-sum-exp (−inf on a row that attends to nothing).
    """
    P = axis_size
    me = lax.axis_index(axis_name)
    w = jnp.float64 if query.dtype == jnp.float64 else jnp.float32
    B, Tc, N, H = query.shape
    Sc, K = key.shape[1], key.shape[2]
    G = N // K
    q, do = query.astype(w), grad_out.astype(w)
    live = jnp.isfinite(lse)
    lse = jnp.where(live, lse, 0.0).astype(w)
    d = jnp.einsum("btnh,btnh->bnt", do, out.astype(w))
    dq = jnp.zeros_like(q)
    kr, vr = key, value
    dk = jnp.zeros((B, Sc, K, H), w)
    dv = jnp.zeros_like(dk)
    perm = [(i, (i + 1) % P) for i in range(P)]
    diagonal = jnp.tril(jnp.ones((Tc, Sc), bool))
    for r in range(P):
        j = (me - r) % P  # the device whose chunk is here
        k, v = jnp.repeat(kr.astype(w), G, axis=2), jnp.repeat(vr.astype(w), G, axis=2)
        s = scale * jnp.einsum("btnh,bsnh->bnts", q, k)
        keep = live[..., None]
        if is_causal:  # blocks above the diagonal attend nothing, the diagonal block its lower triangle
            keep = keep & ((j < me) | ((j == me) & diagonal))
        p = jnp.where(keep, jnp.exp(s - lse[..., None]), 0.0)
        ds = p * (jnp.einsum("btnh,bsnh->bnts", do, v) - d[..., None])
        dq = dq + scale * jnp.einsum("bnts,bsnh->btnh", ds, k)
        dk = dk + scale * jnp.einsum("bnts,btnh->bsnh", ds, q).reshape(B, Sc, K, G, H).sum(3)
        dv = dv + jnp.einsum("bnts,btnh->bsnh", p, do).reshape(B, Sc, K, G, H).sum(3)
        if r < P - 1:
            kr, vr, dk, dv = lax.ppermute((kr, vr, dk, dv), axis_name, perm)
    if P > 1:  # the accumulators here belong to device me + 1; ours are on device me − 1
        dk, dv = lax.ppermute((dk, dv), axis_name, perm)
    return dq.astype(query.dtype), dk.astype(key.dtype), dv.astype(value.dtype)


__all__ = ["backward"]
