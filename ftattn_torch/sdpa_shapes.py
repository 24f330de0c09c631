"""SDPA's shapes as ftattn's: the drop-in's translation of the inputs
``scaled_dot_product_attention`` takes beyond ``(B, N, T, H)``.

SDPA takes query ``(..., N, T, H)``, key and value ``(..., K, S, H)`` with any
number of leading axes that broadcast against each other (``(T, H)`` too), and
axes of size zero. :func:`canonical` turns such a call into one of rank 4 (the
leading axes broadcast and flattened into ``B``) and says how to shape the
output back; :func:`degenerate` computes a call with a zero-size axis, where
there is nothing to check.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ftattn_spec import implementations
from ftattn_spec.axes import REPORT_AXES
from ftattn_spec.report import CheckResult, make_report
from ftattn_spec.schemes import CHECK_ORIENTATION

_NAMES = ("query", "key", "value")


class Canonical(NamedTuple):
    """A call in rank 4, and the leading axes of the output (None: the inputs were rank 4)."""

    query: Tensor
    key: Tensor
    value: Tensor
    attn_mask: Tensor | None
    lead: tuple[int, ...] | None = None
    #: the query was ``(T, H)``: the output is ``(T, H)`` too
    flat: bool = False


def _lead(name: str, x: Tensor) -> tuple[int, ...]:
    if x.ndim < 2:
        raise ValueError(f"{name}: expected at least 2 dimensions ((..., T, H) as scaled_dot_product_attention "
                         f"takes), got shape {tuple(x.shape)}")
    return tuple(x.shape[:-3])


def canonical(query, key, value, attn_mask) -> Canonical:
    """``query``, ``key``, ``value`` and ``attn_mask`` in rank 4 ``(B, N, T, H)``. Calls already in
    rank 4 with one batch size pass unchanged; anything not a tensor is left to the validation."""
    qkv = (query, key, value)
    if not all(isinstance(x, Tensor) for x in qkv):
        return Canonical(query, key, value, attn_mask)
    if all(x.ndim == 4 for x in qkv) and query.shape[0] == key.shape[0] == value.shape[0]:
        return Canonical(query, key, value, attn_mask)
    leads = [_lead(n, x) for n, x in zip(_NAMES, qkv)]
    try:
        lead = torch.broadcast_shapes(*leads)
    except RuntimeError:
        raise ValueError(f"query, key, value: expected leading (batch) axes that broadcast, got query "
                         f"{tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}") from None
    b = math.prod(lead)

    def rank4(x: Tensor) -> Tensor:
        heads = x.shape[-3] if x.ndim >= 3 else 1
        return x.reshape(*x.shape[:-2][:max(x.ndim - 3, 0)], heads, *x.shape[-2:]).expand(
            *lead, heads, *x.shape[-2:]).reshape(b, heads, *x.shape[-2:])

    q, k, v = (rank4(x) for x in qkv)
    mask = attn_mask
    if isinstance(attn_mask, Tensor) and attn_mask.ndim > 2 and len(lead) != 1:
        # broadcast over the leading axes, then flatten them into B (a copy only where a view cannot do it)
        n, t, s = q.shape[1], q.shape[2], k.shape[2]
        try:
            mask = attn_mask.expand(*lead, n, t, s).reshape(b, n, t, s)
        except RuntimeError:
            raise ValueError(f"attn_mask: expected a shape broadcastable to {(*lead, n, t, s)}, "
                             f"got {tuple(attn_mask.shape)}") from None
    return Canonical(q, k, v, mask, tuple(lead), query.ndim == 2)


def restore(out: Tensor, c: Canonical) -> Tensor:
    """The output ``(B, N, T, Hv)`` in the shape SDPA gives for the original inputs."""
    if c.lead is None:
        return out
    out = out.reshape(*c.lead, *out.shape[1:])
    return out[..., 0, :, :] if c.flat and out.shape[-3] == 1 else out


def has_zero_size(query: Tensor, key: Tensor, value: Tensor) -> bool:
    return any(0 in x.shape for x in (query, key, value))


def degenerate(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, bias: Tensor | None,
               is_causal: bool, scale: float | None, *, scheme: str, granularity: str):
    """Attention with a zero-size axis, as SDPA computes it: ``B``, ``N`` or ``T`` of zero give an
    empty output, ``S`` of zero gives zeros, ``H`` of zero averages the attended values. Plain
    float32, in the autograd graph; the report is clean with empty or all-clear verdicts (there
    are no products to check), and ``ran`` says so."""
    B, N, T, H = query.shape
    K, S = key.shape[1], key.shape[2]
    G = N // K if K else 1
    scale = 1.0 / math.sqrt(H) if scale is None and H else (1.0 if scale is None else scale)
    kf = key.float().repeat_interleave(G, dim=1)
    vf = value.float().repeat_interleave(G, dim=1)
    s = (query.float() @ kf.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.float()
    keep = None
    if is_causal:
        keep = torch.ones(T, S, dtype=torch.bool, device=query.device).tril()
    if mask is not None:
        keep = mask if keep is None else keep & mask
    if S and s.numel():
        if keep is not None:
            s = s.masked_fill(~keep, -torch.inf)
        m = s.amax(-1, keepdim=True)
        z = (s - m.masked_fill(m == -torch.inf, 0.0)).exp()
        d = z.sum(-1, keepdim=True)
        s = z / torch.where(d > 0, d, 1.0)  # a row attending nothing gives zeros
    out = (s @ vf).to(query.dtype)
    dims = {"B": B, "N": N, "T": T, "S": S, "H": H}
    checks = {}
    for name in implementations.checks_for("torch", "unfused", scheme):
        size = tuple(dims[a] for a in REPORT_AXES[(granularity, CHECK_ORIENTATION[name])])
        zero = torch.zeros(size, dtype=torch.float32, device=query.device)
        checks[name] = CheckResult(zero, zero.clone(), torch.zeros(size, dtype=torch.bool, device=query.device))
    false = torch.zeros((), dtype=torch.bool, device=query.device)
    report = make_report(detected=false, checks=checks, inputs_finite=~false, located={},
                         corrected=torch.zeros((), dtype=torch.int32, device=query.device))
    return out, report
