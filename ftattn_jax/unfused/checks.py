"""The six checks, as pure JAX functions at vector granularity.

Each check returns ``(diff, threshold)``: ``diff`` is the signed difference
actual − predicted (for ``softmax_dmr`` the non-negative L1 distance between the
replicas, for ``softmax_exp`` each row's ratio to its bound, against 1) and
``threshold`` the bound of ``docs/tolerances.md``. ``verdict``
turns them into a ``CheckResult`` at the requested granularity.

Shapes use the legend of ``ftattn_spec.axes``; ``G = N // K`` query heads share
one kv head, and query head ``n`` is ``(kv head n // G, group member n % G)``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

from ftattn_spec import exp_checksum as ec
from ftattn_spec import tolerances as tol

F32 = jnp.float32
NEG = float(jnp.finfo(F32).min)  # masked logits: large, finite, so no row is NaN (``core`` fills them)
LOG2E = math.log2(math.e)


def _blocks(x: Array, axis: int) -> Array:
    """Move ``axis`` last and split it into (blocks, reduction_block) with zero padding."""
    x = jnp.moveaxis(x, axis, -1)
    n = x.shape[-1]
    b = tol.reduction_block(n)
    nb = -(-n // b)
    if nb * b != n:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * b - n)])
    return x.reshape(*x.shape[:-1], nb, b)


def blocked_sum(x: Array, axis: int) -> Array:
    """Σ along ``axis`` as a two-level sum, the structure ``tol.blocked_gamma`` bounds.

    The barrier keeps XLA from fusing the two levels back into one reduction
    of its own order.
    """
    partial = lax.optimization_barrier(_blocks(x, axis).sum(-1))
    return partial.sum(-1)


def blocked_cumsum(x: Array, axis: int) -> Array:
    """Inclusive prefix sums along ``axis``, two-level like :func:`blocked_sum`."""
    n = x.shape[axis]
    xb = _blocks(x, axis)
    inner = jnp.cumsum(xb, axis=-1)
    totals = lax.optimization_barrier(inner[..., -1])
    offsets = jnp.cumsum(totals, axis=-1)
    offsets = jnp.concatenate([jnp.zeros_like(offsets[..., :1]), offsets[..., :-1]], axis=-1)  # exclusive
    c = (inner + offsets[..., None]).reshape(*xb.shape[:-2], -1)[..., :n]
    return jnp.moveaxis(c, -1, axis)


def _prefix_rows(x: Float[Array, "B L K H"], n_rows: int) -> Float[Array, "B R K H"]:
    """Row r holds Σ_{l <= min(r, L-1)} x_l: the causal prefix sums along L."""
    c = blocked_cumsum(x, axis=1)
    idx = jnp.minimum(jnp.arange(n_rows), x.shape[1] - 1)
    return c[:, idx]


def _suffix_rows(x: Float[Array, "B L N H"], n_rows: int) -> Float[Array, "B R N H"]:
    """Row r holds Σ_{r <= l < L} x_l (zero for r >= L): causal suffix sums along L."""
    c = blocked_cumsum(x[:, ::-1], axis=1)[:, ::-1]
    c = jnp.concatenate([c, jnp.zeros_like(c[:, :1])], axis=1)
    idx = jnp.minimum(jnp.arange(n_rows), x.shape[1])
    return c[:, idx]


def _heads_dot(a: Float[Array, "B #R K #G H"] | Float[Array, "B #R K H"],
               b: Float[Array, "B #R K #G H"] | Float[Array, "B #R K H"]) -> Float[Array, "B N R"]:
    """Σ_h a·b per (batch, query head, row) as a float32 elementwise product and sum.

    Kept off the matrix units on purpose: a float32 matmul may run at TF32
    precision on GPUs, which the tolerance model would have to absorb.
    """
    if a.ndim == 4:
        a = a[:, :, :, None]
    if b.ndim == 4:
        b = b[:, :, :, None]
    r = jnp.sum(a * b, axis=-1)  # B R K G
    B, R, K, G = r.shape
    return r.reshape(B, R, K * G).transpose(0, 2, 1)


def _masked_sums(allowed, x: Float[Array, "B L X H"], rows: bool, K: int):
    """Σ over attended positions of ``x`` and of ``|x|``: a float32 product with the 0/1 mask.

    ``rows=True``: keys summed per query row, ``x`` is K ``B S K H`` and the
    result ``B T K H`` (or ``B T K G H`` for a per-head mask). ``rows=False``:
    queries summed per key column, ``x`` is Q ``B T N H`` and the result
    ``B S N H``. Returns ``(sum, abs_sum)``.
    """
    B, H = x.shape[0], x.shape[-1]
    xx = jnp.concatenate([x, jnp.abs(x)], axis=-1)
    a = allowed.astype(F32)
    hi = lax.Precision.HIGHEST
    _, Nm, T, S = a.shape
    if Nm == 1:
        a3 = jnp.broadcast_to(a[:, 0], (B, T, S))
        spec = "bts,bskh->btkh" if rows else "bts,btnh->bsnh"
        r = jnp.einsum(spec, a3, xx, precision=hi, preferred_element_type=F32)
    elif rows:
        N = Nm
        a5 = jnp.broadcast_to(a, (B, N, T, S)).reshape(B, K, N // K, T, S)
        r = jnp.einsum("bkgts,bskh->btkgh", a5, xx, precision=hi, preferred_element_type=F32)
    else:
        a4 = jnp.broadcast_to(a, (B, Nm, T, S))
        r = jnp.einsum("bnts,btnh->bsnh", a4, xx, precision=hi, preferred_element_type=F32)
    return r[..., :H], r[..., H:]


def qk_row(q: Float[Array, "B T K G H"], k: Float[Array, "B S K H"], s_masked: Float[Array, "B N T S"],
           scale: float, is_causal: bool, dtype: str, allowed=None):
    """Row sums of S against scale·q_i·(Σ over attended keys of k).

    ``allowed`` (``B|1 N|1 T S`` bool) is a general mask; without it only
    ``is_causal`` restricts the keys and the sums of K are (prefix) sums.
    """
    T, S, H = q.shape[1], k.shape[1], q.shape[-1]
    qf, kf = q.astype(F32), k.astype(F32)
    if allowed is not None:
        ksum, kabs = _masked_sums(allowed, kf, True, k.shape[2])  # B T K H or B T K G H
    elif is_causal:
        ksum, kabs = _prefix_rows(kf, T), _prefix_rows(jnp.abs(kf), T)  # B T K H
    else:
        ksum, kabs = blocked_sum(kf, 1)[:, None], blocked_sum(jnp.abs(kf), 1)[:, None]  # B 1 K H
    actual = blocked_sum(s_masked, -1)
    predicted = _heads_dot(qf, ksum) * scale
    magnitude = _heads_dot(jnp.abs(qf), kabs) * scale
    coef = tol.qk_coefficient(S, H, dtype, masked=allowed is not None)
    return actual - predicted, tol.threshold(coef, magnitude, S, H)


def qk_col(q: Float[Array, "B T K G H"], k: Float[Array, "B S K H"], s_masked: Float[Array, "B N T S"],
           scale: float, is_causal: bool, dtype: str, allowed=None):
    """Column sums of S against scale·(Σ over attending queries of q)·k_j."""
    B, T, K, G, H = q.shape
    S = k.shape[1]
    qf, kf = q.astype(F32).reshape(B, T, K * G, H), k.astype(F32)
    if allowed is not None:
        qsum, qabs = _masked_sums(allowed, qf, False, K)  # B S N H
    elif is_causal:
        qsum, qabs = _suffix_rows(qf, S), _suffix_rows(jnp.abs(qf), S)  # B S N H
    else:
        qsum, qabs = blocked_sum(qf, 1)[:, None], blocked_sum(jnp.abs(qf), 1)[:, None]  # B 1 N H
    kb = kf[:, :, :, None]  # B S K 1 H
    actual = blocked_sum(s_masked, -2)
    predicted = _heads_dot(qsum.reshape(B, -1, K, G, H), kb) * scale
    magnitude = _heads_dot(qabs.reshape(B, -1, K, G, H), jnp.abs(kb)) * scale
    coef = tol.qk_coefficient(T, H, dtype, masked=allowed is not None)
    return actual - predicted, tol.threshold(coef, magnitude, T, H)


def softmax_dmr(p: Float[Array, "B N T S"], p_replica: Float[Array, "B N T S"], mu: Float[Array, "B N T"]):
    """L1 distance between the two softmax replicas of each row, and its threshold:
    ``tol.dmr_threshold`` (S alone) plus the term of the logit magnitude ``mu``
    (``tol.dmr_logit_coefficient``)."""
    l1 = jnp.abs(p - p_replica).sum(axis=-1)
    return l1, tol.dmr_threshold(p.shape[-1]) + jnp.minimum(
        2.0 * jnp.expm1(2.0 * tol.dmr_logit_coefficient() * mu), tol.DMR_LOGIT_CAP)


def _tile_sums(x: Float[Array, "B N T S"]) -> Float[Array, "B N T C"]:
    """Sums over tiles of ``ec.TILE`` keys (the last one zero-padded)."""
    S = x.shape[-1]
    nt = ec.tiles(S)
    if nt * ec.TILE != S:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nt * ec.TILE - S)])
    return x.reshape(*x.shape[:-1], nt, ec.TILE).sum(-1)


def softmax_exp(p: Float[Array, "B N T S"], logits: Float[Array, "B N T S"], scores: Float[Array, "B N T S"] | None,
                keep: Bool[Array, "#B #N T #S"] | None, dtype: str, with_lse: bool = False):
    """The exponential checksum of each row (``ftattn_spec.exp_checksum``): ``(ratio, ones)``, ``B N T``
    (``with_lse``: ``(ratio, ones, lse)``, ``lse`` the row's natural log-sum-exp from the check's own
    maximum and row sum, −inf for a row with no live entry).

    ``p``: the normalised probabilities as the output reads them; ``logits``: the masked logits
    the softmax read (``NEG`` where masked); ``scores``: S before the bias (None without one),
    for the row's logit magnitude μ; ``keep``: where ``p`` may be nonzero (None: everywhere).
    The live entries (kept, logit above ``NEG``) enter both sides; the check forms its own row
    maximum, row sum ``d = Σ exp2(l·c − m·c)`` and arguments ``l·c − m·c − log₂ d`` (c = log₂ e;
    the softmax exponentiated ``l − m``), through a barrier so that XLA cannot merge them with
    the softmax's. ``L`` is the exponents of ``frexp`` (exact) plus the logarithms of the
    mantissas. The ratio is the row's largest ``|L_t − R_t| / τ_t`` over its tiles, 0 for a row
    with no live entry (``empty="uniform"`` spreads such a row over its ``NEG`` logits: not
    checked), +inf for a row with a non-finite probability or kept logit (NaN, +inf) and for
    one with a nonzero probability where the softmax gives exactly 0: outside ``keep``, at a
    −inf logit, or at a ``NEG`` logit in a row with a live entry (``exp(NEG − m)`` is 0).
    """
    W = p.dtype
    l, c = lax.optimization_barrier((logits.astype(W), jnp.asarray(LOG2E, W)))
    live = l > NEG
    if keep is not None:
        live = live & keep
    has = jnp.any(live, axis=-1, keepdims=True)
    m = jnp.max(jnp.where(live, l, -jnp.inf), axis=-1, keepdims=True)
    y = jnp.where(live, l * c - jnp.where(has, m, 0.0) * c, -jnp.inf)
    d = blocked_sum(jnp.exp2(y), -1)[..., None]
    x = y - jnp.log2(jnp.where(d > 0, d, 1.0))
    r = _tile_sums(jnp.where(live, jnp.clip(x, -ec.CLAMP, 0.0), 0.0))
    mant, ex = jnp.frexp(jnp.maximum(p, jnp.asarray(2.0**-ec.CLAMP, W)))
    e = _tile_sums(jnp.where(live, ex.astype(W), 0.0))  # integers: exact
    f = _tile_sums(jnp.where(live, jnp.log2(mant), 0.0))
    mag = jnp.abs(l) if scores is None else jnp.maximum(jnp.abs(l), jnp.abs(scores.astype(W)))
    mu = jnp.max(jnp.where(live, mag, 0.0), axis=-1, keepdims=True) * LOG2E
    tau = ec.tile_threshold(ec.exp_coefficients(ec.TILE, p.shape[-1], normalised=True), -r, mu)
    ratio = jnp.max(jnp.abs((e - r) + f) / tau, axis=-1)
    # P as the P·V product reads it (in ``dtype``) sums to 1 in a row that attends anything
    S = p.shape[-1]
    total = blocked_sum(p.astype(dtype).astype(W), -1)
    norm = jnp.abs(total - 1.0) / ec.sum_threshold(ec.sum_coefficients(S, dtype), 1.0, 0.0, S)
    ratio = jnp.maximum(ratio, jnp.where(has[..., 0], norm, 0.0))
    zero = has | (l < NEG)  # where the softmax gives exactly 0 (besides outside keep)
    broken = jnp.isnan(l) | (l == jnp.inf)
    if keep is not None:
        zero, broken = zero | ~keep, broken & keep
    bad = jnp.any(~live & zero & (p != 0), -1) | jnp.any(~jnp.isfinite(p), -1) | jnp.any(broken, -1)
    ratio = jnp.where(bad, jnp.inf, ratio)
    if with_lse:
        lse = jnp.where(has & (d > 0), m + jnp.log2(jnp.where(d > 0, d, 1.0)) * (1.0 / LOG2E), -jnp.inf)[..., 0]
        return ratio, jnp.ones_like(ratio), lse
    return ratio, jnp.ones_like(ratio)


def pv_row(o: Float[Array, "B T K G H"], p_mma: Array, v: Float[Array, "B S K H"], dtype: str):
    """Row sums of O = P̂V against P̂·(V·1), with P̂ the probabilities as fed to the GEMM.

    ``p_mma`` is ``B K G T S`` in the input dtype. The prediction and the
    magnitude ``W_i = P̂·|V|·1`` are float32 products summed over keys in two
    levels (blocks of ``tol.reduction_block(S)``), like the other checksums.
    """
    S, H = v.shape[1], v.shape[-1]
    vf = v.astype(F32)
    cols = jnp.stack([vf.sum(axis=-1), jnp.abs(vf).sum(axis=-1)], axis=-1)  # B S K 2
    pb = _blocks(p_mma, -1)  # B K G T C X
    cb = _blocks(cols, 1)  # B K 2 C X
    partial = jnp.einsum("bkgtcx,bkdcx->bkgtdc", pb.astype(F32), cb,
                         precision=lax.Precision.HIGHEST, preferred_element_type=F32)
    pred_mag = lax.optimization_barrier(partial).sum(-1)  # B K G T 2
    B, K, G, T, _ = pred_mag.shape
    pred_mag = pred_mag.reshape(B, K * G, T, 2)
    actual = o.sum(axis=-1).reshape(B, T, K * G).transpose(0, 2, 1)
    return actual - pred_mag[..., 0], tol.threshold(tol.pv_coefficient(S, H, dtype), pred_mag[..., 1], S, H)


def pv_col(o: Float[Array, "B T K G H"], p_mma: Array, v: Float[Array, "B S K H"], dtype: str):
    """Column sums of O = P̂V over the T rows against (1ᵀP̂)·V, per head-dim column.

    ``c_j = Σ_i p̂_ij`` is a two-level float32 sum over rows; the prediction
    ``Σ_j c_j·v_jh`` and the magnitude ``W'_h = Σ_j c_j·|v_jh|`` are float32
    products summed over keys in two levels. Returns ``B N H`` arrays.
    """
    T, S = o.shape[1], v.shape[1]
    vf = jnp.moveaxis(v.astype(F32), 1, -1)  # B K H S
    cols = jnp.stack([vf, jnp.abs(vf)], axis=2)  # B K 2 H S
    c = blocked_sum(p_mma.astype(F32), 3)  # B K G S
    partial = jnp.einsum("bkgcx,bkdhcx->bkgdhc", _blocks(c, -1), _blocks(cols, -1),
                         precision=lax.Precision.HIGHEST, preferred_element_type=F32)
    pred_mag = lax.optimization_barrier(partial).sum(-1)  # B K G 2 H
    B, K, G, _, H = pred_mag.shape
    pred_mag = pred_mag.reshape(B, K * G, 2, H)
    actual = blocked_sum(o, 1).reshape(B, K * G, H)
    return (actual - pred_mag[:, :, 0],
            tol.threshold(tol.pv_col_coefficient(T, S, dtype), pred_mag[:, :, 1], S, T))
