"""Tile helpers of the portable Pallas kernels: the lengths and the band of tiles a block
visits (forward and backward), and for the backward P's exponent and mask per tile, P itself,
the FMA-pipe exponential of ``bwd_softmax_col``, and the sum of an accumulator's columns.
Legend of ``ftattn_spec.axes``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax.numpy as jnp
from jax import lax

if TYPE_CHECKING:
    from .backward_inputs import BackwardConfig

LOG2E = math.log2(math.e)
F32 = jnp.float32


def _ends(cfg, qlen_ref, klen_ref, b):
    """``(qend, kend)``: batch ``b``'s query and key lengths, clipped to the call's (``cfg``: this
    kernel's or the backward's config)."""
    qend = jnp.minimum(cfg.T, qlen_ref[b]) if cfg.has_qlen else jnp.int32(cfg.T)
    kend = jnp.clip(klen_ref[b], 0, cfg.S) if cfg.has_klen else jnp.int32(cfg.S)
    return qend, kend


def _band(lo_idx, hi_idx, end, left, right):
    """``[lo, hi)`` of the keys rows ``lo_idx..hi_idx`` attend (or, roles swapped, the rows that
    attend some keys), empty when ``hi_idx < lo_idx``."""
    lo = jnp.maximum(lo_idx - left, 0)
    hi = jnp.minimum(end, hi_idx + right + 1)
    hi = jnp.where(hi_idx < lo_idx, 0, jnp.maximum(hi, 0))
    return jnp.minimum(lo, hi), hi


def _exponent(s, r2, c2, live2, kend, lse2, cfg: BackwardConfig, mask_t, bias_t):
    """The argument ``x_ij = z_ij·c_z − LSE_i`` of P's exponential for one tile of raw scores
    ``s``, clamped at 0 as in the Triton backward, and where a mask form keeps the entry. The
    tile's query and key indices (and the rows' liveness and LSE) broadcast from ``r2`` and
    ``c2``: queries × keys in the dQ kernel, keys × queries in the dK/dV kernel."""
    left, right = cfg.band
    if cfg.has_bias:
        zc = (s * cfg.scale + bias_t.astype(F32)) * LOG2E
    else:
        zc = s * (cfg.scale * LOG2E)
    keep = (c2 < kend) & (c2 >= r2 - left) & (c2 <= r2 + right) & live2
    if cfg.has_mask:
        keep = keep & (mask_t != 0)
    return jnp.minimum(zc - lse2, 0.0), keep


def _probs(*args):
    """P of one tile (:func:`_exponent`'s arguments), zero where a mask form leaves an entry out."""
    x, keep = _exponent(*args)
    return jnp.where(keep, jnp.exp2(x), 0.0)


#: 2^f on [-1/2, 1/2], degree 5 (relative error 2.8e-7), highest power first
_EXP2_POLY = (0.0013240507105365396, 0.009663134813308716, 0.05550714582204819, 0.240223690867424,
              0.6931470632553101, 1.0)


def _exp2_fma(x):
    """2^x for x <= 0 on the FMA pipe, not the exponential unit: ``bwd_softmax_col``'s second
    evaluation. r = floor(x + 1/2) goes into the exponent bits, a polynomial gives 2^f for
    f = x − r in [-1/2, 1/2); x < -125 gives 0. (Rounding by adding and subtracting 1.5·2²³,
    as the Triton kernel does, is folded away by XLA's simplifier in interpret mode.)"""
    xc = jnp.maximum(x, -127.0)
    r = jnp.floor(xc + 0.5)
    f = xc - r
    poly = jnp.full_like(f, _EXP2_POLY[0])
    for coef in _EXP2_POLY[1:]:
        poly = poly * f + coef
    bits = lax.bitcast_convert_type(poly, jnp.int32) + jnp.left_shift(r.astype(jnp.int32), 23)
    return jnp.where(x < -125.0, 0.0, lax.bitcast_convert_type(bits, F32))


def _column(acc, c0: int, parts: int):
    col = lax.broadcasted_iota(jnp.int32, acc.shape, 1)
    return jnp.sum(jnp.where((col >= c0) & (col < c0 + parts), acc, 0.0), axis=1)
