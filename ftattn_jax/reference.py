"""Plain attention in float32, unchecked: the readable oracle of outputs and gradients.

``attention`` is the formula tests compare the implementations' outputs and gradients
against (the fused kernels have their own backward, ``fused/pallas_backward.py``). It
imports nothing of the implementations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

F32 = jnp.float32


def attention(q: Float[Array, "B T N H"], k: Float[Array, "B S K H"], v: Float[Array, "B S K H"], scale: float,
              causal: bool, *, bias=None, allowed=None, uniform: bool = False,
              query_lengths=None) -> Float[Array, "B T N H"]:
    """softmax(scale·QKᵀ + bias, over the attended keys)·V in float32; query head ``n`` reads kv
    head ``n // (N // K)``.

    ``causal``: keys ``j <= i``; ``allowed`` (bool, broadcastable to ``B N T S``): the other mask
    forms combined; ``bias`` broadcastable to ``B N T S``. A row with nothing attended is zero,
    or with ``uniform`` (jax.nn's rule) the mean of every value row, except rows at or beyond
    ``query_lengths``, which stay zero.
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    kf = jnp.repeat(k.astype(F32), N // K, axis=2)
    vf = jnp.repeat(v.astype(F32), N // K, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q.astype(F32), kf, precision=jax.lax.Precision.HIGHEST) * scale
    if bias is not None:
        s = s + bias.astype(F32).reshape((1,) * (4 - bias.ndim) + tuple(bias.shape))
    a = jnp.ones((1, 1, T, S), bool)
    if causal:
        a = a & (jnp.arange(S)[None, None, None, :] <= jnp.arange(T)[None, None, :, None])
    if allowed is not None:
        a = a & allowed
    s = jnp.where(a, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.where(a, jnp.exp(s - jnp.where(m > -jnp.inf, m, 0.0)), 0.0)
    d = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(d > 0, d, 1.0)
    if uniform:
        empty = ~jnp.any(a, axis=-1, keepdims=True)
        if query_lengths is not None:
            empty = empty & (jnp.arange(T)[None, :] < query_lengths[:, None])[:, None, :, None]
        p = jnp.where(empty, 1.0 / S, p)
    o = jnp.einsum("bnts,bsnh->btnh", p, vf, precision=jax.lax.Precision.HIGHEST)
    return o
