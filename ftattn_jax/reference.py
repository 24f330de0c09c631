"""Plain attention in float32, unchecked: the fused kernels' backward and the gradient oracle.

``attention`` is the readable formula the fused kernel's ``custom_vjp`` differentiates
(its backward is this function's, not checked), and what tests compare
gradients against. It imports nothing of the implementations.
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


def attention_vjp(q, k, v, scale: float, causal: bool, grad_out, *, bias=None, allowed=None, uniform=False,
                  query_lengths=None):
    """Gradients of :func:`attention` with respect to ``q``, ``k``, ``v`` and ``bias`` (None
    without one), in their dtypes."""
    fn = lambda q, k, v, b: attention(q, k, v, scale, causal, bias=b, allowed=allowed,  # noqa: E731
                                      uniform=uniform, query_lengths=query_lengths)
    _, vjp = jax.vjp(fn, q, k, v, bias)
    dq, dk, dv, db = vjp(grad_out.astype(F32))
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            None if bias is None else db.astype(bias.dtype))
