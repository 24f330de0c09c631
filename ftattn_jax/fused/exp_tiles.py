"""The exponential checksum ``softmax_exp`` inside the portable kernel: one tile's ratio.

``ftattn_spec.exp_checksum`` defines the check. Per row and tile of keys, over
the live entries (logit ``z > −inf``: attended, not masked),

    L = Σ log₂ max(p, 2^−CLAMP)      against      R = Σ clip(x~, −CLAMP, 0),

``x~ = z·c − m·c`` the check's own argument (the exponential saw ``(z − m)·c``).
``L`` is an integer sum of exponent fields plus log₂ of the product of the
mantissas, scaled into [0.75, 1.5): Pallas' Triton lowering has no product
reduction, so the product is a tree of halves (:func:`log2_product`), one
logarithm per row and tile; a logarithm per element (``MANTISSAS = "each"``,
within the per-entry allowance of :func:`~ftattn_spec.exp_checksum.exp_coefficients`
too) costs a libdevice ``logf`` per element on the GPU (measured: docs/kernels.md,
"The exponential checksum in the portable Pallas forward"). Only element-wise
operations, sums, splits and bitcasts: the kernel lowers through Triton and runs
in interpret mode alike.

The Hopper kernel (:mod:`.mosaic_kernel`) runs the same check on its register tiles with
:func:`hopper_tile_ratio`: no product reduction there either, and no column split below the
wgmma layout's 8 columns, so its mantissa products stop at 8 per row and tile.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ftattn_spec import exp_checksum

F32 = jnp.float32
CLAMP = float(exp_checksum.CLAMP)
_FLOOR = 2.0 ** -CLAMP


def log2_fields(p):
    """``(e, mant)`` with ``p = 2^e · mant``, ``e`` int32 and ``mant`` in [0.75, 1.5), for normal
    finite float32 ``p > 0`` (the caller clamps): ``e = (bits + 2²²) >> 23`` rounds the biased
    exponent up where the mantissa is at least 1.5."""
    bits = lax.bitcast_convert_type(p, jnp.int32)
    e = jnp.right_shift(bits + 0x400000, 23) - 127
    return e, lax.bitcast_convert_type(bits - jnp.left_shift(e, 23), F32)


#: at most this many mantissas in [0.75, 1.5) are multiplied before a logarithm (1.5⁶⁴ < 2¹²⁸)
PRODUCT = 64
#: "product": log₂ of the product of the mantissas (a tree of halves, one log2 per PRODUCT
#: entries); "each": log₂ of every mantissa (a logarithm per element)
MANTISSAS = "product"


def log2_product(mant):
    """``Σ_j log₂ mant_j`` per row of ``mant`` (``BM × BN``, BN a power of two, entries in
    [0.75, 1.5)): Pallas' Triton lowering has no product reduction, so the columns are multiplied
    in a tree of halves (``lax.split``, which it lowers), up to PRODUCT per product, then one
    logarithm per product."""
    if MANTISSAS == "each":
        return jnp.sum(jnp.log2(mant), axis=1)
    span, x = 1, mant
    while span < min(PRODUCT, mant.shape[1]):
        a, b = jnp.split(x, 2, axis=1)
        x, span = a * b, 2 * span
    if x.shape[1] == 1:
        return jnp.log2(x.reshape(x.shape[0]))
    return jnp.sum(jnp.log2(x), axis=1)


def tile_ratio(z, p, c, m_sc, width: int, S: int):
    """Per row ``|L_t − R_t| / τ_t`` of one tile of ``width`` keys in rows of ``S`` (0 where nothing
    is live; +inf where a probability outside the live entries is not 0).

    ``z`` ``BM × BN``: the logits (−inf where not attended), ``p``: the probabilities as the kernel
    uses them (``exp2((z − m)·c)``, after any injected fault), ``c`` the base-2 factor (static),
    ``m_sc`` ``(BM,)``: ``m·c``, the running maximum at this tile (``μ = |m·c|``).
    """
    co = exp_checksum.exp_coefficients(width, S, normalised=False)  # the kernel's p is unnormalised
    arg = z * c - m_sc[:, None]  # the check's own argument formula
    live = z > -jnp.inf
    e, mant = log2_fields(jnp.where(live, jnp.maximum(p, F32(_FLOOR)), 1.0))  # p < 0 (a flipped sign) counts as 2^−CLAMP
    L = jnp.sum(e, axis=1).astype(F32) + log2_product(mant)
    R = jnp.sum(jnp.where(live, jnp.minimum(jnp.maximum(arg, -CLAMP), 0.0), 0.0), axis=1)
    ratio = jnp.abs(L - R) / exp_checksum.tile_threshold(co, -R, jnp.abs(m_sc))
    # a nonzero probability where the exponential gives exactly 0 (a masked entry) fails closed, as
    # in the unfused path (a max, not jnp.any: Pallas' Triton lowering has no reduce_or)
    stray = jnp.max(jnp.where(live | (p == 0.0), 0.0, 1.0), axis=1)
    return jnp.where(stray > 0.0, jnp.inf, ratio)


def rescale_ratio(alpha, m_raw, m_new, m_sc, c):
    """Per row ``|α − α'| / τ``: the rescale factor as the kernel used it (faults included) against
    ``α' = 2^(min(m_raw·c − m·c, 0))``, ``τ = (rel + mu·μ)·α' + tiny``
    (``exp_checksum.rescale_coefficients``); both 0 at a row's first attended tile, 1 while it has
    attended nothing."""
    co = exp_checksum.rescale_coefficients()
    a2 = jnp.where(m_new > -jnp.inf, jnp.exp2(jnp.minimum(m_raw * c - m_sc, 0.0)), 1.0)
    mu = jnp.where(m_raw > -jnp.inf, jnp.maximum(jnp.abs(m_raw * c), jnp.abs(m_sc)), 0.0)
    return jnp.abs(alpha - a2) / ((co.rel + co.mu * mu) * a2 + co.tiny)


def row_residual(worst, l):
    """A row's residual: its worst tile ratio, +inf where the row sum ``l`` is not finite (a NaN
    or infinite probability; a row that attends nothing has ``worst = 0`` and ``l = 0``)."""
    return jnp.where(jnp.abs(l) < jnp.inf, worst, jnp.inf)


#: columns the Hopper kernel's mantissa products stop at: its register tiles (the wgmma layout)
#: are 8 columns wide, so a tile of 128 keys ends in 8 products of 16 mantissas and 8 logarithms
HOPPER_COLUMNS = 8
#: how the Hopper kernel can take Σ log₂ p (:func:`hopper_tile_ratio`); the first is the default, the
#: fastest of those measured on the H200 (docs/kernels.md, "The three ways of taking Σ log₂ p" and
#: "Products of raw probabilities")
HOPPER_LOGS = ("quads", "pairs", "each", "rounded", "fields")
#: "pairs" and "quads" multiply 2 and 4 raw probabilities before one logarithm; each is clamped at
#: 2^−clamp with ``group · clamp ≤ 124``, so a product stays a normal float32 (``lg2.approx.ftz``
#: flushes below 2⁻¹²⁶) and the other forms keep the spec's clamp. A probability below 2⁻³¹ weighs
#: less than 2⁻³¹ against a row sum of at least 1: a fault that stays below it cannot show in a
#: float16 or bfloat16 output, and one that lifts it above moves L.
HOPPER_GROUP = {"pairs": 2, "quads": 4}
HOPPER_CLAMP = {"pairs": 62.0, "quads": 31.0}
_INV_LN2 = 1.4426950408889634
_EXP_BIAS = 8388608.0 + 127.0  # 2²³ + 127: bitcast(2²³'s bits | e_biased) − this = e, exactly


def _halving_product(mant):
    """Multiply the columns of ``mant`` pairwise (left half by right half) down to HOPPER_COLUMNS."""
    while mant.shape[1] > HOPPER_COLUMNS:
        h = mant.shape[1] // 2
        mant = mant[:, :h] * mant[:, h:]
    return mant


def hopper_log2_sum(pc, logs: str = HOPPER_LOGS[0]):
    """``Σ_j log₂ pc_j`` per row of ``pc`` (``BQ × width``, normal positive float32) in the Hopper
    kernel's registers, three ways (``HOPPER_LOGS``):

    * ``"each"``: a hardware-approximate logarithm per element;
    * ``"rounded"``: exponent fields rounded so that each
      mantissa lies in [0.75, 1.5), summed as floats made exact without an integer-to-float
      conversion per element (``bitcast(2²³ | e) − 2²³``), mantissas multiplied by halving the
      columns down to HOPPER_COLUMNS, one logarithm per product;
    * ``"fields"``: the exponent fields summed as integers (one shift per element, a conversion
      per row), the mantissas in [1, 2) (an and, an or), the same products: fewer operations per
      element;
    * ``"pairs"``, ``"quads"`` (the default: the fastest on the H200, docs/kernels.md): 2 or 4 of the
      probabilities themselves multiplied (clamped at 2^−``HOPPER_CLAMP``), a logarithm per
      product: a half or a quarter of ``"each"``'s logarithms and no integer work.
    """
    if logs == "each":
        return jnp.sum(jnp.log(pc), axis=1) * F32(_INV_LN2)  # (jnp.log2 would take a scalar log in the kernel)
    if logs in HOPPER_GROUP:  # columns j and j + width/2 multiplied, once or twice: products ≥ 2⁻¹²⁴
        prod = pc
        for _ in range(HOPPER_GROUP[logs].bit_length() - 1):
            h = prod.shape[1] // 2
            prod = prod[:, :h] * prod[:, h:]
        return jnp.sum(jnp.log(prod), axis=1) * F32(_INV_LN2)
    bits = lax.bitcast_convert_type(pc, jnp.int32)
    if logs == "fields":
        e = jnp.sum(jnp.right_shift(bits, 23), axis=1).astype(F32) - F32(127 * pc.shape[1])
        mant = lax.bitcast_convert_type((bits & 0x7FFFFF) | 0x3F800000, F32)
    else:
        eb = jnp.right_shift(bits + 0x400000, 23)  # the biased exponent, rounded up where the mantissa is ≥ 1.5
        e = jnp.sum(lax.bitcast_convert_type(eb | 0x4B000000, F32) - _EXP_BIAS, axis=1)
        mant = lax.bitcast_convert_type(bits - jnp.left_shift(eb - 127, 23), F32)
    return e + jnp.sum(jnp.log(_halving_product(mant)), axis=1) * F32(_INV_LN2)


def hopper_tile_ratio(s, p, c, m_sc, width: int, S: int, *, keep=None, rows, logs: str = HOPPER_LOGS[0]):
    """:func:`tile_ratio` in the Hopper kernel's registers: ``s`` ``BQ × width`` the raw scores
    (−inf where ``keep`` is False), ``p`` the probabilities (faults included), ``c`` the base-2
    factor, ``m_sc`` the row maximum times ``c`` (a row vector), ``rows(x)`` broadcasts a row
    vector across a tile. Without ``keep`` (a tile with no mask) no select is spent: every entry
    counts. Same check and bound; ``L`` by :func:`hopper_log2_sum` (``logs``); the argument is
    not clipped at 0 from above (it exceeds 0 by at most a rounding of ``|m_sc|``, inside the
    ``mu`` term)."""
    co = exp_checksum.exp_coefficients(width, S, normalised=False)
    clamp = HOPPER_CLAMP.get(logs, CLAMP)
    xt = jnp.maximum(s * c - rows(m_sc), -clamp)  # −inf (masked) gives −clamp
    pc = jnp.maximum(p, F32(2.0 ** -clamp))
    stray = None
    if keep is not None:  # masked entries out of both sides; a nonzero probability there fails the row
        xt = jnp.where(keep, xt, 0.0)
        pc = jnp.where(keep, pc, 1.0)
        stray = jnp.max(jnp.where(keep | (p == 0.0), 0.0, 1.0), axis=1)
    R = jnp.sum(xt, axis=1)
    ratio = jnp.abs(hopper_log2_sum(pc, logs) - R) / exp_checksum.tile_threshold(co, -R, jnp.abs(m_sc))
    return ratio if stray is None else jnp.where(stray > 0.0, jnp.inf, ratio)
