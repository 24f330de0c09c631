"""Plain attention in float32, unchecked: the fused kernel's backward and the gradient oracle.

:func:`attention_backward` is the backward of the SDPA operator and of the
fused Triton kernel (not checked). It imports nothing of the implementations.
"""

from __future__ import annotations

import torch

from ftattn_spec import masking

from .common import ops as ops_on
from .common import reduce_to

_F32 = torch.float32


def split_mask(attn_mask):
    """SDPA's ``attn_mask``: a bool mask (True = attend) or an additive float bias, as ``(mask, bias)``."""
    if attn_mask is None:
        return None, None
    return (attn_mask, None) if attn_mask.dtype == torch.bool else (None, attn_mask)


def attention_backward(query, key, value, attn_mask, is_causal: bool, scale: float, grad_out, *,
                       allowed=None):
    """Gradients of plain attention (float32, not checked) with respect to query,
    key, value and a float ``attn_mask`` (None for a bool mask). ``allowed`` (bool,
    broadcastable to ``B N T S``) masks further: the combined mask forms of
    ``ftattn_spec.masking.combine``."""
    B, N, T, H = query.shape
    K, S = key.shape[1], key.shape[2]
    G = N // K
    mask, bias = split_mask(attn_mask)
    if allowed is not None:
        mask = allowed if mask is None else mask & allowed
    if grad_out is None:
        grad_out = torch.zeros_like(query)
    qf = query.to(_F32)
    kf = key.to(_F32).repeat_interleave(G, dim=1)
    vf = value.to(_F32).repeat_interleave(G, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(_F32)
    ops = ops_on(query.device)
    a = masking.attended(masking.combine(B, T, S, ops, mask=mask, is_causal=is_causal), is_causal, T, S, ops)
    if a is not None:
        s = s.masked_fill(~a, -torch.inf)
    m = s.amax(-1, keepdim=True)
    z = (s - m.masked_fill(m == -torch.inf, 0.0)).exp()
    d = z.sum(-1, keepdim=True)
    p = z / torch.where(d > 0, d, 1.0)
    go = grad_out.to(_F32)
    dv = (p.transpose(-1, -2) @ go).reshape(B, K, G, S, H).sum(2)
    dp = go @ vf.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = (ds @ kf) * scale
    dk = ((ds.transpose(-1, -2) @ qf) * scale).reshape(B, K, G, S, H).sum(2)
    dbias = None if bias is None else reduce_to(ds, bias)
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype), dbias
