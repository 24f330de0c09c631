"""The six checks, as PyTorch functions at vector granularity.

Same algebra and thresholds as ``ftattn_jax.checks``; each check returns
``(diff, threshold)`` (``softmax_exp``: each row's ratio to its bound, against 1)
and :func:`verdict` makes the ``CheckResult``. Tensors use
the legend of ``ftattn_spec.axes``: query heads are grouped as ``B K G T H``
with ``G = N // K`` (query head ``n`` reads kv head ``n // G``).
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ftattn_spec import exp_checksum as ec
from ftattn_spec import tolerances as tol

F32 = torch.float32
NEG = torch.finfo(F32).min  # masked logits: large, finite, so no row is NaN (``core`` fills them)
LOG2E = math.log2(math.e)


def _blocks(x: Tensor, dim: int) -> Tensor:
    """Move ``dim`` last and split it into (blocks, reduction_block) with zero padding."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    b = tol.reduction_block(n)
    nb = -(-n // b)
    if nb * b != n:
        x = torch.nn.functional.pad(x, (0, nb * b - n))
    return x.reshape(*x.shape[:-1], nb, b)


def blocked_sum(x: Tensor, dim: int) -> Tensor:
    """Σ along ``dim`` as a two-level sum, the structure ``tol.blocked_gamma`` bounds.

    Works on views (no copy of ``x``, whatever ``dim``): full blocks of
    ``tol.reduction_block(n)`` terms, then a shorter last block if ``n`` is not
    a multiple, then the sum of the block sums.
    """
    dim = dim % x.ndim
    n = x.shape[dim]
    b = tol.reduction_block(n)
    full = n // b
    parts = []
    if full:
        head = x.narrow(dim, 0, full * b)
        parts.append(head.reshape(*x.shape[:dim], full, b, *x.shape[dim + 1:]).sum(dim + 1))
    if n > full * b:
        parts.append(x.narrow(dim, full * b, n - full * b).sum(dim, keepdim=True))
    return (torch.cat(parts, dim) if len(parts) > 1 else parts[0]).sum(dim)


def blocked_cumsum(x: Tensor, dim: int) -> Tensor:
    """Inclusive prefix sums along ``dim``, two-level like :func:`blocked_sum`."""
    n = x.shape[dim]
    xb = _blocks(x, dim)
    inner = xb.cumsum(-1)
    totals = inner[..., -1]
    offsets = torch.nn.functional.pad(totals.cumsum(-1)[..., :-1], (1, 0))  # exclusive
    c = (inner + offsets[..., None]).reshape(*xb.shape[:-2], -1)[..., :n]
    return c.movedim(-1, dim)


def _prefix_rows(x: Float[Tensor, "B K L H"], n_rows: int) -> Float[Tensor, "B K R H"]:
    """Row r holds Σ_{l <= min(r, L-1)} x_l: the causal prefix sums along L."""
    idx = torch.arange(n_rows, device=x.device).clamp(max=x.shape[2] - 1)
    return blocked_cumsum(x, 2)[:, :, idx]


def _suffix_rows(x: Float[Tensor, "B K G L H"], n_rows: int) -> Float[Tensor, "B K G R H"]:
    """Row r holds Σ_{r <= l < L} x_l (zero for r >= L): causal suffix sums along L."""
    c = blocked_cumsum(x.flip(3), 3).flip(3)
    c = torch.cat([c, torch.zeros_like(c[:, :, :, :1])], dim=3)
    idx = torch.arange(n_rows, device=x.device).clamp(max=x.shape[3])
    return c[:, :, :, idx]


def _flat_heads(x: Float[Tensor, "B K G R"]) -> Float[Tensor, "B N R"]:
    B, K, G, R = x.shape
    return x.reshape(B, K * G, R)


def _masked_sums(allowed: Tensor, x: Float[Tensor, "B K G L H"] | Float[Tensor, "B K L H"], rows: bool):
    """Σ over attended positions of ``x`` and of ``|x|``: a float32 product with the 0/1 mask.

    ``rows=True``: ``x`` is K ``B K S H``, the result ``B K G T H`` (G = 1 for
    a mask shared by the heads) holds the sums of attended keys per query row.
    ``rows=False``: ``x`` is Q ``B K G T H``, the result ``B K G S H`` the sums
    of attending queries per key column. Returns ``(sum, abs_sum)``.
    """
    H = x.shape[-1]
    xx = torch.cat([x, x.abs()], dim=-1)
    _, Nm, T, S = allowed.shape
    B, K = x.shape[0], x.shape[1]
    if Nm == 1:
        a = allowed[:, 0].expand(B, T, S).to(F32)
        r = (torch.einsum("bts,bksh->bkth", a, xx)[:, :, None] if rows
             else torch.einsum("bts,bkgth->bkgsh", a, xx))
    else:
        a = allowed.expand(B, Nm, T, S).reshape(B, K, Nm // K, T, S).to(F32)
        r = torch.einsum("bkgts,bksh->bkgth", a, xx) if rows else torch.einsum("bkgts,bkgth->bkgsh", a, xx)
    return r[..., :H], r[..., H:]


def qk_row(q: Float[Tensor, "B K G T H"], k: Float[Tensor, "B K S H"], s_masked: Float[Tensor, "B N T S"],
           scale: float, is_causal: bool, dtype: str, tf32: bool, allowed: Tensor | None = None):
    """Row sums of S against scale·q_i·(Σ over attended keys of k).

    ``allowed`` (``B|1 N|1 T S`` bool) is a general mask; without it only
    ``is_causal`` restricts the keys and the sums of K are (prefix) sums. The
    products with the key sums are float32 elementwise products and sums,
    kept off the matrix units so that no TF32 rounding enters the prediction.
    """
    T, S, H = q.shape[3], k.shape[2], q.shape[-1]
    qf, kf = q.to(F32), k.to(F32)
    if allowed is not None:
        ksum, kabs = _masked_sums(allowed, kf, True)  # B K G|1 T H
    elif is_causal:
        ksum, kabs = _prefix_rows(kf, T)[:, :, None], _prefix_rows(kf.abs(), T)[:, :, None]  # B K 1 T H
    else:
        ksum, kabs = blocked_sum(kf, 2)[:, :, None, None], blocked_sum(kf.abs(), 2)[:, :, None, None]  # B K 1 1 H
    actual = blocked_sum(s_masked, -1)
    predicted = _flat_heads((qf * ksum).sum(-1)) * scale
    magnitude = _flat_heads((qf.abs() * kabs).sum(-1)) * scale
    coef = tol.qk_coefficient(S, H, dtype, tf32, masked=allowed is not None)
    return actual - predicted, tol.threshold(coef, magnitude, S, H)


def qk_col(q: Float[Tensor, "B K G T H"], k: Float[Tensor, "B K S H"], s_masked: Float[Tensor, "B N T S"],
           scale: float, is_causal: bool, dtype: str, tf32: bool, allowed: Tensor | None = None):
    """Column sums of S against scale·(Σ over attending queries of q)·k_j."""
    T, S, H = q.shape[3], k.shape[2], q.shape[-1]
    qf, kf = q.to(F32), k.to(F32)
    if allowed is not None:
        qsum, qabs = _masked_sums(allowed, qf, False)  # B K G S H
    elif is_causal:
        qsum, qabs = _suffix_rows(qf, S), _suffix_rows(qf.abs(), S)  # B K G S H
    else:
        qsum, qabs = blocked_sum(qf, 3)[:, :, :, None], blocked_sum(qf.abs(), 3)[:, :, :, None]  # B K G 1 H
    kb = kf[:, :, None]  # B K 1 S H
    actual = blocked_sum(s_masked, -2)
    predicted = _flat_heads((qsum * kb).sum(-1)) * scale
    magnitude = _flat_heads((qabs * kb.abs()).sum(-1)) * scale
    coef = tol.qk_coefficient(T, H, dtype, tf32, masked=allowed is not None)
    return actual - predicted, tol.threshold(coef, magnitude, T, H)


def softmax_dmr(p: Float[Tensor, "B N T S"], p_replica: Float[Tensor, "B N T S"], mu: Float[Tensor, "B N T"]):
    """L1 distance between the two softmax replicas of each row, and its threshold:
    ``tol.dmr_threshold`` (S alone) plus the term of the logit magnitude ``mu``
    (``tol.dmr_logit_coefficient``). Overwrites ``p_replica``."""
    l1 = torch.linalg.vector_norm(p_replica.sub_(p), ord=1, dim=-1)
    term = torch.expm1(2.0 * tol.dmr_logit_coefficient() * mu.to(torch.float32)).mul_(2.0).clamp_(max=tol.DMR_LOGIT_CAP)
    return l1, term.add_(tol.dmr_threshold(p.shape[-1]))


def _tile_sums(x: Float[Tensor, "B N T S"]) -> Float[Tensor, "B N T C"]:
    """Sums over tiles of ``ec.TILE`` keys (the last one zero-padded)."""
    S = x.shape[-1]
    nt = ec.tiles(S)
    if nt * ec.TILE != S:
        x = torch.nn.functional.pad(x, (0, nt * ec.TILE - S))
    return x.reshape(*x.shape[:-1], nt, ec.TILE).sum(-1)


def softmax_exp(p: Float[Tensor, "B N T S"], logits: Float[Tensor, "B N T S"], scores: Tensor | None,
                keep: Bool[Tensor, "#B #N T #S"] | None, dtype: str, with_lse: bool = False):
    """The exponential checksum of each row (``ftattn_spec.exp_checksum``): ``(ratio, ones)``, ``B N T``
    (``with_lse``: and the row's natural log-sum-exp from the check's own maximum and row sum).

    As ``ftattn_jax.unfused.checks.softmax_exp``: ``p`` the normalised probabilities, ``logits``
    the masked logits the softmax read (``NEG`` where masked), ``scores`` S before the bias (None
    without one) for μ, ``keep`` where ``p`` may be nonzero (None: everywhere). The live entries
    (kept, logit above ``NEG``) enter both sides with the check's own row maximum, row sum
    ``d = Σ exp2(l·c − m·c)`` and arguments ``l·c − m·c − log₂ d``; ``L`` is ``frexp``'s exponents
    plus the logarithms of the mantissas. The ratio is the largest ``|L_t − R_t| / τ_t`` over the
    row's tiles, 0 for a row with no live entry, +inf for a non-finite probability or kept logit
    and for a nonzero probability where the softmax gives exactly 0 (outside ``keep``, at a −inf
    logit, at a ``NEG`` logit in a row with a live entry).
    """
    W = p.dtype
    l = logits.to(W)
    live = l > NEG
    if keep is not None:
        live &= keep
    has = live.any(-1, keepdim=True)
    m = torch.where(live, l, -torch.inf).amax(-1, keepdim=True)
    y = torch.where(live, l * LOG2E - torch.where(has, m, 0.0) * LOG2E, -torch.inf)
    d = blocked_sum(torch.exp2(y), -1)[..., None]
    y -= torch.log2(torch.where(d > 0, d, 1.0))
    r = _tile_sums(torch.where(live, y.clamp_(-ec.CLAMP, 0.0), 0.0))
    del y
    mant, ex = torch.frexp(p.clamp(min=2.0**-ec.CLAMP))
    e = _tile_sums(torch.where(live, ex.to(W), 0.0))  # integers: exact
    del ex
    f = _tile_sums(torch.where(live, mant.log2_(), 0.0))
    del mant
    mag = l.abs() if scores is None else torch.maximum(l.abs(), scores.to(W).abs())
    mu = torch.where(live, mag, 0.0).amax(-1, keepdim=True) * LOG2E
    del mag
    tau = ec.tile_threshold(ec.exp_coefficients(ec.TILE, p.shape[-1], normalised=True), -r, mu)
    ratio = ((e - r) + f).abs_().div_(tau).amax(-1)
    # P as the P·V product reads it (in ``dtype``) sums to 1 in a row that attends anything
    S = p.shape[-1]
    total = blocked_sum(p.to(getattr(torch, dtype)).to(W), -1)
    norm = (total - 1.0).abs_().div_(ec.sum_threshold(ec.sum_coefficients(S, dtype), 1.0, 0.0, S))
    ratio = torch.maximum(ratio, torch.where(has[..., 0], norm, 0.0))
    zero = has | (l < NEG)  # where the softmax gives exactly 0 (besides outside keep)
    broken = l.isnan() | (l == torch.inf)
    if keep is not None:
        zero, broken = zero | ~keep, broken & keep
    bad = (~live & zero & (p != 0)).any(-1) | (~p.isfinite()).any(-1) | broken.any(-1)
    ratio = ratio.masked_fill_(bad, torch.inf)
    if with_lse:
        ok = has & (d > 0)
        lse = torch.where(ok, torch.where(has, m, 0.0) + torch.where(d > 0, d, 1.0).log2() * (1.0 / LOG2E),
                          -torch.inf)[..., 0]
        return ratio, torch.ones_like(ratio), lse
    return ratio, torch.ones_like(ratio)


def pv_row(o: Float[Tensor, "BK GT H"], p_mma: Tensor, v: Float[Tensor, "B K S H"], n_heads: int,
           dtype: str, tf32: bool):
    """Row sums of O = P̂V against P̂·(V·1), with P̂ (``BK GT S``) as fed to the GEMM.

    The prediction and the magnitude ``W_i = P̂·|V|·1`` are float32 products
    summed over keys in two levels (blocks of ``tol.reduction_block(S)``).
    """
    B, K, S, H = v.shape
    vf = v.to(F32)
    cols = _blocks(torch.stack([vf.sum(-1), vf.abs().sum(-1)], dim=-2).reshape(B * K, 2, S), -1)
    # Upcast P̂ a slice of (batch, kv head) pairs at a time, about 1 GiB of
    # float32 per slice: a copy of all of it would be as large as S.
    slices = -(-p_mma.numel() * 4 // 2**30)
    step = max(1, -(-p_mma.shape[0] // slices))
    pred_mag = torch.cat([
        torch.einsum("xtcb,xdcb->xtdc", _blocks(p_mma[i:i + step].to(F32), -1), cols[i:i + step]).sum(-1)
        for i in range(0, p_mma.shape[0], step)
    ]).reshape(B, n_heads, -1, 2)  # B N T 2
    actual = o.sum(-1).reshape(B, n_heads, -1)
    return actual - pred_mag[..., 0], tol.threshold(tol.pv_coefficient(S, H, dtype, tf32), pred_mag[..., 1], S, H)


def pv_col(o: Float[Tensor, "BK GT H"], p_mma: Tensor, v: Float[Tensor, "B K S H"], n_heads: int,
           dtype: str, tf32: bool):
    """Column sums of O = P̂V over the T rows against (1ᵀP̂)·V, per head-dim column.

    ``c_j = Σ_i p̂_ij`` is a two-level float32 sum over rows; the prediction
    ``Σ_j c_j·v_jh`` and the magnitude ``W'_h = Σ_j c_j·|v_jh|`` are float32
    products summed over keys in two levels. Returns ``B N H`` tensors.
    """
    B, K, S, H = v.shape
    G = n_heads // K
    T = o.shape[1] // G
    vt = v.to(F32).transpose(-1, -2)  # B K H S
    cols = _blocks(torch.stack([vt, vt.abs()], dim=2).reshape(B * K, 2, H, S), -1)  # BK 2 H C X
    slices = -(-p_mma.numel() * 4 // 2**30)  # upcast P̂ about 1 GiB at a time, as in pv_row
    step = max(1, -(-p_mma.shape[0] // slices))
    c = torch.cat([blocked_sum(p_mma[i:i + step].view(-1, G, T, S).to(F32), 2)
                   for i in range(0, p_mma.shape[0], step)])  # BK G S
    pred_mag = torch.einsum("xgcb,xdhcb->xgdhc", _blocks(c, -1), cols).sum(-1).reshape(B, n_heads, 2, H)
    actual = blocked_sum(o.view(B * K, G, T, H), 2).reshape(B, n_heads, H)
    return (actual - pred_mag[:, :, 0],
            tol.threshold(tol.pv_col_coefficient(T, S, dtype, tf32), pred_mag[:, :, 1], S, T))
