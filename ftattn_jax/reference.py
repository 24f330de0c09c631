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
              causal: bool) -> Float[Array, "B T N H"]:
    """softmax(scale·QKᵀ (causal: keys ``j <= i``))·V in float32; query head ``n`` reads kv head ``n // (N // K)``."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    qg = q.astype(F32).reshape(B, T, K, N // K, H)
    s = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(F32), precision=jax.lax.Precision.HIGHEST) * scale
    if causal:
        s = jnp.where(jnp.arange(S)[None, :] <= jnp.arange(T)[:, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bkgts,bskh->btkgh", p, v.astype(F32), precision=jax.lax.Precision.HIGHEST)
    return o.reshape(B, T, N, H)


def attention_vjp(q, k, v, scale: float, causal: bool, grad_out):
    """Gradients of :func:`attention` with respect to ``q``, ``k``, ``v``, in their dtypes."""
    _, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, scale, causal), q, k, v)
    dq, dk, dv = vjp(grad_out.astype(F32))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
