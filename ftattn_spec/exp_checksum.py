"""The exponential checksum ``softmax_exp``: its definition, clamp, tiles and threshold.

``exp2`` turns sums into products. For every query row and every tile of keys,
with ``x_j`` the base-2 argument of the exponential (``(s_j − m)·c``, and for
normalised probabilities minus ``log₂ d``, ``d`` the row sum),

    L = Σ_j log₂ max(p_j, 2^−CLAMP)      against      R = Σ_j max(x_j, −CLAMP)

over the tile's attended entries. The left side needs no logarithm per
element: it is the sum of the exponent fields of the p_j (integer arithmetic)
plus log₂ of the product of their mantissas (one logarithm per tile). The
right side is the argument a second time, formed by its own formula
(``s·c − m·c`` where the exponential saw ``(s − m)·c``), so a fault in the
exponential, in the argument that feeds it, or in a probability after it, moves
``L − R``. A fault in ``p_j`` by a factor ``1 + δ`` moves it by
``log₂(1 + δ)``; a flipped exponent bit by at least 1.

The clamp keeps both sides finite: a probability below 2^−CLAMP (and a masked
one, which is 0) counts as 2^−CLAMP, its argument as −CLAMP. Such a
probability weighs less than 2^−64 against a row sum of at least 1, far below
float32 resolution, so a fault that stays below it cannot matter; one that
lifts it above moves ``L`` and is caught. Masked entries are left out of both
sides (they are exact either way, but would inflate the summation bound).

A row's residual is the largest ``|L_t − R_t| / τ_t`` over its tiles (in
units of each tile's bound), its threshold 1. Per tile, in log₂ units,

    τ_t = tile + arg·A_t + mu·μ,     A_t = Σ_j |max(x_j, −CLAMP)|,

with ``μ`` the row's largest |logit| in log₂ units (``|m·c|`` in a kernel);
the coefficients are :func:`exp_coefficients`, derived in docs/tolerances.md
("softmax_exp"). In the fused kernels the check also evaluates the online
softmax's rescale factor twice per row and tile (:func:`rescale_coefficients`):
a fault there scales everything the row summed before that tile.

The check also covers what carries the probabilities from the exponential to
the output: per row, the probabilities as the P·V product reads them (``p̂``,
in the input dtype) must sum to the normaliser the output divides by
(:func:`sum_coefficients`). In the fused kernels that is ``l`` against the
tensor cores' ``P̂·1`` (a column of ones beside ``pv_row``'s columns), which
covers the row sum ``l`` and the float32 → float16/bfloat16 conversion of P;
in the unfused path, where P is normalised before the product, it is
``Σ_j p̂_j`` against 1. A row's residual is the larger of its worst tile's
ratio and this one's.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

from . import tolerances as tol

#: Probabilities below 2^−CLAMP (and their arguments below −CLAMP) count as 2^−CLAMP.
CLAMP: float = 64.0

#: Keys per tile of the unfused implementations (the fused kernels use their key blocks).
TILE: int = 64

#: Error of XLA's CPU ``exp2`` (exp(x·ln 2), what JAX's interpret mode and unfused path run)
#: beyond ``EXP_ERROR_UNITS``, per unit of |x|, in log₂ units of u: 68.9u relative at
#: |x| = 125 (``backward_tolerances.EXP2_WIDE_UNITS``) is 0.8u·|x| in log₂ units.
EXP2_ARG_UNITS: float = 1.0


class ExpCoefficients(NamedTuple):
    """The threshold ``tile + arg·A_t + mu·μ`` of one tile of ``softmax_exp`` (log₂ units).

    ``tile``: per tile, whatever the data (the exponentials' own error, the
    logarithms, the mantissa product); ``arg``: per unit of ``A_t`` (the
    arguments' two formulas and the sum of R); ``mu``: per unit of the row's
    largest |logit| (the row maximum's rounding, in every entry).
    """

    tile: float
    arg: float
    mu: float


@functools.lru_cache(maxsize=256)
def exp_coefficients(width: int, S: int, normalised: bool = False) -> ExpCoefficients:
    """The :class:`ExpCoefficients` of tiles of ``width`` keys in rows of ``S`` keys.

    Per entry (u = 2⁻²⁴, log₂ units): the exponential, ``EXP_ERROR_UNITS·u`` relative
    (``/ln 2``) plus ``EXP2_ARG_UNITS·u·|x|`` where it is evaluated as exp(x·ln 2); the two
    argument formulas, ``(s − m)·c`` (two roundings) against ``s·c − m·c`` (a fused
    multiply-add and a rounded ``m·c``), at most ``3u·|x| + u·μ`` apart, and a compiler that
    re-forms the logit (the unfused path, ``tol.dmr_logit_coefficient``) ``κ·u·μ`` more;
    the mantissa's logarithm, 2u. Normalised probabilities (the unfused path) add the
    division (u) and ``log₂ d`` (``2u·(1 + log₂ S)``). Per tile: the product of ``width``
    mantissas in [0.75, 1.5) (γ(width), /ln 2), the logarithm of it (``2u·0.6·width + 4u``),
    the sum of the per-element logarithms or exponents (γ(width)·width), and the sum of R
    (γ(width)·A_t).
    """
    u = tol.U_ACC
    n = max(int(width), 1)
    g = tol.gamma(n)
    entry = u * (tol.EXP_ERROR_UNITS / math.log(2.0) + 2.0)
    if normalised:
        entry += u * (1.0 + 2.0 * (1.0 + math.log2(max(int(S), 1))))
    tile = n * entry + g / math.log(2.0) + u * (1.2 * n + 4.0) + g * n
    arg = u * (3.0 + EXP2_ARG_UNITS + 1.0) + g
    mu = n * u * (1.0 + tol.DMR_LOGIT_UNITS + 1.0)
    m = tol.MAGNITUDE_MARGIN
    return ExpCoefficients(m * tile, m * arg, m * mu)


class RescaleCoefficients(NamedTuple):
    """The bound ``(rel + mu·μ)·α' + tiny`` on ``|α − α'|``, the fused kernels' rescale factor
    ``α = 2^((m_old − m_new)·c)`` against its second evaluation ``α' = 2^(m_old·c − m_new·c)``
    (``μ`` the larger of ``|m_old·c|`` and ``|m_new·c|``, log₂ units)."""

    rel: float
    mu: float
    tiny: float


def rescale_coefficients() -> RescaleCoefficients:
    """Two exponentials (``EXP_ERROR_UNITS``·u each, and XLA's exp(x·ln 2), ``EXP2_ARG_UNITS``·u·|x|
    in log₂ units, with |x| ≤ 2μ); arguments ``(m_old − m_new)·c`` (two roundings) against
    ``m_old·c − m_new·c`` (three), each at most u·μ: ``ln 2·u·(5 + 2·EXP2_ARG_UNITS)·μ`` relative;
    both values flush to 0 below 2⁻¹²⁶ (``tiny``)."""
    u = tol.U_ACC
    m = tol.MAGNITUDE_MARGIN
    rel = (2.0 * tol.EXP_ERROR_UNITS + 2.0) * u
    mu = math.log(2.0) * u * (5.0 + 2.0 * EXP2_ARG_UNITS) * 2.0
    return RescaleCoefficients(m * rel, m * mu, 4.0 * tol.TINY)


class SumCoefficients(NamedTuple):
    """The bound ``(rel + rescale·r)·l + per_key·S + tiny`` on ``|Σ_j p̂_j − l|`` (l the row's
    normaliser; ``r`` the rises of its running maximum after the first tile, fused only)."""

    rel: float
    rescale: float
    per_key: float
    tiny: float


@functools.lru_cache(maxsize=256)
def sum_coefficients(S: int, dtype: str, width: int | None = None) -> SumCoefficients:
    """The :class:`SumCoefficients` of rows of ``S`` keys in ``dtype``; ``width`` the fused
    kernel's key tile, None for the unfused path.

    Both: the conversion of each p to the input dtype, ``u_in`` relative, or ``UNDERFLOW_IN``
    absolute where p̂ falls below the dtype's normal range (float16: 2⁻²⁵ per key, hence
    ``per_key``). Fused: ``l`` sums each tile in float32 (γ(width)) and the tiles (γ(tiles + 1));
    ``P̂·1`` accumulates on the tensor cores (γ(S), as ``pv_row``'s prediction); each rise of the
    maximum rescales both sides, one rounding each (2u); flushes to zero, ``tiny`` per operation.
    Unfused: ``p = e / d`` (a division, u; ``d`` a two-level float32 sum), and ``Σ p̂`` a two-level
    float32 sum (``tol.blocked_gamma(S)`` each)."""
    S = max(int(S), 1)
    u_in, u = tol.UNIT_ROUNDOFF[dtype], tol.U_ACC
    if width is None:
        rel = u_in + u + 2.0 * tol.blocked_gamma(S)
        rescale = 0.0
    else:
        tiles = -(-S // max(int(width), 1))
        rel = u_in + tol.gamma(width) + tol.gamma(tiles + 1) + tol.gamma(S)
        rescale = 2.0 * u
    m = tol.MAGNITUDE_MARGIN
    return SumCoefficients(m * rel, m * rescale, m * tol.UNDERFLOW_IN[dtype], tol.underflow_allowance(4 * S))


def sum_threshold(co: SumCoefficients, l, rises, S: int):
    """The bound on ``|Σ_j p̂_j − l|`` for arrays of any framework (only ``*`` and ``+``)."""
    return (co.rel + co.rescale * rises) * l + co.per_key * S + co.tiny


def tile_threshold(co: ExpCoefficients, arg_magnitude, mu):
    """``τ_t`` for arrays of any framework (only ``*`` and ``+`` are applied)."""
    return co.tile + co.arg * arg_magnitude + co.mu * mu


def tiles(S: int, width: int = TILE) -> int:
    """Number of tiles of ``width`` keys over ``S`` keys."""
    return -(-max(int(S), 1) // width)
