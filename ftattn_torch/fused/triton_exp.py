"""The exponential checksum ``softmax_exp`` of one tile, for the Triton forward (:mod:`.triton_kernel`).

``ftattn_spec.exp_checksum`` defines it: per row, ``L = Σ_j log₂ max(p_j, 2^−CLAMP)``
against ``R = Σ_j clip(x̃_j, −CLAMP, 0)`` over the attended entries, with
``x̃_j = z_j·c − m·c`` formed by another formula than the exponential's argument
``(z_j − m)·c``. ``L`` costs integer work per element and one ``log2`` per row:
the exponent fields, rounded so that each mantissa lies in [0.75, 1.5), are
summed as integers, and the mantissas are multiplied (a product of 128 such
factors stays within float32's range) (``FORM`` 1, ``BlockSizes(exp_logs="fields")``); or
adjacent probabilities are multiplied in pairs, each clamped at 2⁻⁶² so that a pair stays a
normal float32, and one ``log2`` is taken per pair (``FORM`` 2, ``"pairs"``: no integer
work, one row reduction fewer, but slower on the H200: docs/kernels.md, "Pairs of probabilities
per logarithm in the Triton forward").
"""

from __future__ import annotations

import triton
import triton.language as tl

CLAMP = tl.constexpr(64.0)
TWO_POW_NEG_CLAMP = tl.constexpr(5.421010862427522e-20)  # 2^-64, exact
PAIR_CLAMP = tl.constexpr(62.0)
TWO_POW_NEG_PAIR_CLAMP = tl.constexpr(2.168404344971009e-19)  # 2^-62, exact
#: the forms of Σ log₂ p, in the order of the kernel's ``EXPC`` (1, 2; 0: no softmax_exp)
FORMS = ("fields", "pairs")


@triton.jit
def _mul(a, b):
    return a * b


@triton.jit
def exp_tile_ratio(p, z, cz, m_sc, coef_tile, coef_arg, coef_mu, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
                   FORM: tl.constexpr):
    """``|L − R| / τ`` per row of the tile: ``p`` the probabilities as they leave the
    exponential (faults included), ``z`` the logits (−inf where not attended), ``cz`` the
    base-2 factor, ``m_sc`` the row maximum times ``cz``; ``τ = tile + arg·A + mu·|m_sc|``
    with ``A = −R``.

    In a tile with an element mask, an entry that is not attended must have p exactly 0 (the
    row fails otherwise). In a tile without one (``MASKED`` False) every entry counts: a logit of −inf
    there (a bias of −inf, a row beyond the query length) gives −CLAMP on both sides exactly,
    so no select is spent on it. The argument is not clipped at 0 from above: it exceeds 0 by
    at most a rounding of ``|m_sc|``, which the ``mu`` term covers.
    """
    if FORM == 2:
        xt = tl.maximum(z * cz - m_sc[:, None], -PAIR_CLAMP)
        pc = tl.maximum(p, TWO_POW_NEG_PAIR_CLAMP)
    else:
        xt = tl.maximum(z * cz - m_sc[:, None], -CLAMP)
        pc = tl.maximum(p, TWO_POW_NEG_CLAMP)
    stray = tl.zeros_like(m_sc)
    if MASKED:
        live = z > float("-inf")
        xt = tl.where(live, xt, 0.0)
        pc = tl.where(live, pc, 1.0)
        # a masked entry whose probability is not exactly 0 (a fault) fails its row
        stray = tl.where(tl.sum(((p != 0.0) & ~live).to(tl.int32), 1) > 0, float("inf"), 0.0)
    r = tl.sum(xt, 1)
    if FORM == 2:  # adjacent columns (held by one thread in the MMA layouts) multiplied: ≥ 2⁻¹²⁴
        a, b = tl.split(tl.reshape(pc, (pc.shape[0], BLOCK_N // 2, 2)))
        lsum = tl.sum(tl.math.log2(a * b), 1)
    else:
        bits = pc.to(tl.int32, bitcast=True)
        e = (bits + 0x400000) >> 23
        mant = (bits - ((e - 127) << 23)).to(tl.float32, bitcast=True)
        lsum = (tl.sum(e, 1) - 127 * BLOCK_N).to(tl.float32) + tl.math.log2(tl.reduce(mant, 1, _mul))
    thr = coef_tile - coef_arg * r + coef_mu * tl.abs(m_sc)
    return tl.abs(lsum - r) / thr + stray


@triton.jit
def rescale_ratio(alpha, m_raw, m_new, m_sc, cz, rel, per_mu, tiny):
    """``|α − α'| / τ`` per row: the rescale factor ``α = 2^((m_raw − m)·c)`` (as the kernel used
    it, faults included) against ``α' = 2^(min(m_raw·c − m·c, 0))``, ``τ = (rel + per_mu·μ)·α' +
    tiny`` (``exp_checksum.rescale_coefficients``). Both are 0 at a row's first attended tile
    and 1 while it has attended nothing."""
    a2 = tl.where(m_new > float("-inf"), tl.math.exp2(tl.minimum(m_raw * cz - m_sc, 0.0)), 1.0)
    mu = tl.where(m_raw > float("-inf"), tl.maximum(tl.abs(m_raw * cz), tl.abs(m_sc)), 0.0)
    return tl.abs(alpha - a2) / ((rel + per_mu * mu) * a2 + tiny)

