"""Thresholds of the fused backward's checks (docs/tolerances.md, "The fused backward").

The backward recomputes S and P tile by tile and forms dP = dO·Vᵀ, dS = P∘(dP − D),
dQ = dS·K·scale, dK = dSᵀ·Q·scale, dV = Pᵀ·dO. Each check compares a sum of one product's
output with the same sum predicted from a summed operand, on the CUDA cores, and accumulates
the signed difference over tiles; the threshold is a coefficient times a magnitude the kernel
accumulates alongside (the same sums with absolute values), plus an underflow allowance. The
checks and their sums, per row ``i`` (query) or key ``j``:

* ``bwd_qk_row``: Σ_j s_ij against q_i·Σ_j k_j over the visited tiles (dQ kernel);
  ``bwd_qk_col``: Σ_i s_ij against (Σ_i q_i)·k_j over the query blocks of the group (dK/dV
  kernel). Magnitude Σ_h |q|·|k| summed alike.
* ``bwd_dp_row``, ``bwd_dp_col``: the same for dP = dO·Vᵀ.
* ``bwd_softmax``: Σ_j p_ij against 1 (0 for a row that attends nothing): catches a corrupted
  log-sum-exp or exponential.
* ``bwd_dq``: Σ_h dq_ih against Σ_j ds̃_ij·(Σ_h k_jh), with ds̃ the dS fed to the product
  (in the input dtype, so both sides read the same values); magnitude Σ_j |ds̃_ij|·Σ_h |k_jh|.
  ``bwd_dk`` (Σ_i ds̃_ij·Σ_h q_ih) and ``bwd_dv`` (Σ_i p̃_ij·Σ_h do_ih) likewise, per key.
  The prediction and the magnitude are extra columns of a tensor-core product: the operand
  sums (Σ_h k_jh, ...) are scaled by ``σ`` (:func:`ftattn_spec.tolerances.fused_vcol_scale`),
  split into three parts of the input dtype, and multiplied by ds̃ (or |ds̃|, or p̃) with
  float32 accumulation, beside a column of ones whose result Σ_j |w_ij| scales the parts'
  underflow allowance ``under``. ``bwd_ds``'s magnitude Σ_j p_ij·Σ_h |v_jh| is read the same
  way with p̃ (P rounded to the input dtype) in place of p, hence the factor ``mag_up`` and
  ``p_under`` times Σ_j Σ_h |v_jh| over the visited keys (p̃ may underflow where p does not:
  measured on the H200 with the "huge" inputs, whose P is meaningless noise near 2⁻¹⁰⁰).
* ``bwd_d``: D_i recomputed in the kernel against the one the backward was given.
* ``bwd_softmax_col`` (per key, dK/dV kernel): that kernel's P against a second evaluation
  of each exponential on the FMA pipe (the polynomial of the forward's softmax replica), as
  Σ over tiles of |Σ_i (p_ij − p'_ij)| (:func:`softmax_col_coefficient`). The kernel sees a
  key block at a time, so no row of its P sums to 1 there; without this check its P was
  judged only by a per-head-group total, whose floor grows with the rows (a campaign on the
  H200 at T=200 missed 5 of 20 faults there).
* ``bwd_ds`` (per row, dQ kernel) and ``bwd_ds_col`` (per key, dK/dV kernel): the sum of dS
  as the kernel fed it to its product against a second evaluation of each term,
  ``p·dp − p·D`` (:func:`ds_coefficient`). A fault in dS, which the gradient checks cannot see
  (they read dS̃ on both sides), shows there; faults in P, dP and D have checks of their own.

Every coefficient is a sum of the float32 accumulation bounds ``tol.gamma`` of the sums on
both sides, plus one ``u`` per rounding, times ``tol.MAGNITUDE_MARGIN``; which sums enter
each is written next to it.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

from . import tolerances as tol

_G = tol.gamma
_U = tol.U_ACC


class BackwardCoefficients(NamedTuple):
    """The fused backward's threshold coefficients, by check (a kernel takes them by name, in
    this order). ``*_allow`` are absolute underflow allowances."""

    qk_row: float
    qk_col: float
    dp_row: float
    dp_col: float
    softmax0: float
    softmax_mu: float
    dq: float
    dk: float
    dv: float
    d: float
    ds: float
    softmax_col: float
    allow_row: float
    allow_col: float
    #: the split operand sums: their scale σ, the factor that keeps a magnitude read from
    #: one rounded part an upper bound, and the absolute error of the parts per unit weight
    sigma: float
    mag_up: float
    under: float
    #: the input dtype's underflow (absolute, per element): where P̃ rounds to zero (float16
    #: below 2⁻²⁵), a magnitude read from P̃ misses up to this much of each p
    p_under: float


def _product_check(H: int, tile: int, tiles: int, dtype: str) -> float:
    """A row (or column) sum of a tile product X·Yᵀ against x·(Σ y): each element a dot product
    of H exact products (γ(H)); the tile's sum (γ(tile)); the prediction's operand sum
    (γ(tile)) and dot product (γ(H)); both sides chained over ``tiles`` tiles (γ(tiles + 1)
    each); five float32 roundings (the tile sums' additions, the difference)."""
    return tol.MAGNITUDE_MARGIN * (2.0 * _G(H) + 2.0 * _G(tile) + 2.0 * _G(tiles + 1) + 5.0 * _U
                                   + tol.product_roundoff(dtype))


def _gradient_check(n: int, H: int, dtype: str) -> float:
    """Σ_h g_jh of a gradient accumulated over ``n`` rows on the tensor cores (γ(n)), summed over
    H (γ(H)), against Σ_i a_i·(Σ_h b_ih) accumulated alike as extra columns of a product (γ(n)):
    the operand row sums (γ(H)), their split into three parts (u_in³ relative, four parts'
    worth), the sum of the parts' columns and the difference (five roundings)."""
    u_in = tol.UNIT_ROUNDOFF[dtype]
    return tol.MAGNITUDE_MARGIN * (2.0 * _G(n) + 2.0 * _G(H) + 4.0 * u_in**3 + 5.0 * _U
                                   + tol.product_roundoff(dtype))


def softmax_coefficients(S: int, block_n: int, fwd_block_n: int) -> tuple[float, float]:
    """``(a0, a_mu)`` of the ``bwd_softmax`` threshold ``a0 + a_mu·|LSE_i|`` on |Σ_j p_ij − 1|.

    p_ij = exp2(x_ij − LSE_i) with x_ij = z_ij·c_z. Per element: the exponential
    (``EXP_ERROR_UNITS``·u); the argument's roundings, ``u·(3|x_ij| + |x_ij − LSE_i|)``
    (the products and, with a bias, the addition forming x, and the subtraction); LSE's own
    error, ``u·|LSE|`` for its addition, ``u·|m·c_z|`` for the product, and log2 of l: l's
    relative error ε_l over ln 2, plus the hardware logarithm's absolute error (``2⁻²¹``,
    counted as ``4u·|LSE|``-independent slack ``2⁻²⁰``). ε_l is the forward's sum: its tile
    sums (γ(fwd_block_n)), their chain (γ(tiles + 1)), two roundings per rescale (at most one
    per tile) and the forward's exponentials and arguments, bounded as here. Summed with weights
    p_ij (Σ p = 1): |x_ij| ≤ |LSE_i| + (LSE_i − x_ij), and Σ_j p_ij·(LSE_i − x_ij) ≤ log2 S
    (an entropy), so every |x| term becomes |LSE| plus log2 S. The backward's own sum of P
    adds γ(block_n) + γ(tiles + 1).
    """
    S = max(int(S), 1)
    tiles_b = math.ceil(S / block_n)
    tiles_f = math.ceil(S / fwd_block_n)
    ln2 = math.log(2.0)
    lg = math.log2(S) + 1.0
    per_element = 2.0 * tol.EXP_ERROR_UNITS * _U + ln2 * _U * 8.0 * lg
    forward_sum = _G(fwd_block_n) + _G(tiles_f + 1) + 2.0 * _U * tiles_f
    backward_sum = _G(block_n) + _G(tiles_b + 1)
    a0 = per_element + forward_sum / ln2 + backward_sum + 2.0 ** -20
    a_mu = ln2 * _U * 12.0
    return tol.MAGNITUDE_MARGIN * a0, tol.MAGNITUDE_MARGIN * a_mu


def ds_coefficient() -> float:
    """Coefficient ``c`` of the ``bwd_ds`` (per row) and ``bwd_ds_col`` (per key) thresholds
    ``c·Σ p·(|dp| + |D|) + allowance`` on ``|Σ (ds − (p·dp − p·D))|``: the sum of dS as the
    kernel used it against a second evaluation of each term in another form.

    Both forms read the same float32 p, dp and D: ``ds = fl(p·fl(dp − D))`` is within
    ``2u·p·|dp − D|`` of ``p·(dp − D)``, and ``fl(fl(p·dp) − fl(p·D))`` within
    ``u·p·|dp| + u·p·|D| + u·|p·dp − p·D|``, so each term of the difference is within
    ``4u·p·(|dp| + |D|)`` of zero (a fused multiply-add rounds less); the sum of those terms
    adds a relative γ of itself, below one more ``u`` of the magnitude. The magnitude is
    bounded from above: per row, ``‖dO_i‖∞·Σ_j p_ij·Σ_h |v_jh| + |D_i|·Σ_j p_ij``; per key,
    ``(Σ_h |v_jh| + max_k Σ_h |v_kh|)·Σ_i p_ij·‖dO_i‖∞`` (|D_i| ≤ ‖dO_i‖∞·‖o_i‖₁, and o_i is an
    average of value rows).
    """
    return tol.MAGNITUDE_MARGIN * 6.0 * _U


#: Relative error bound, in units of u, of the hardware or library exponential 2^x over the
#: whole range that matters here, x in [-126, 0]. ``EXP_ERROR_UNITS`` (16) covers the GPUs'
#: ``ex2``; XLA's CPU ``exp2`` (what JAX's interpret mode runs) computes exp(x·ln 2), whose error
#: grows with |x|: measured 1.4u for |x| < 1, 34u below 50, 68.9u at |x| up to 125 (jax
#: 0.10.2, 200001 points against float64).
EXP2_WIDE_UNITS: float = 80.0


def softmax_col_coefficient(block_m: int, row_tiles: int) -> float:
    """Coefficient ``c`` of the ``bwd_softmax_col`` threshold ``c·Σ_i p_ij + allowance`` on
    ``Σ_tiles |Σ_i (p_ij − p'_ij)|``, with p from the exponential and p' from the FMA
    polynomial, both of the same argument x (its roundings cancel).

    p is within ``EXP2_WIDE_UNITS``·u of 2^x, p' within ``EXP_ERROR_UNITS``·u (its own bound,
    6.2u, is below that), so ``|p − p'| ≤ (EXP2_WIDE_UNITS + EXP_ERROR_UNITS)·u·2^x`` and
    2^x ≤ p·(1 + EXP2_WIDE_UNITS·u); the subtraction is exact (Sterbenz: p and p' are within
    a factor 2); a tile's sum of the differences adds γ(block_m) of their absolute sum, the
    chain over ``row_tiles`` tiles γ(row_tiles + 1); the magnitude Σ_i p_ij, summed alike in
    float32, is low by at most γ(block_m) + γ(row_tiles + 1) of itself. Where 2^x is below
    float32's normal range the two differ by at most 2⁻¹²⁴ per element: the absolute
    allowance ``allow_col`` covers it (4·(H+1) tiny values per row).
    """
    chain = _G(block_m) + _G(row_tiles + 1)
    units = EXP2_WIDE_UNITS + tol.EXP_ERROR_UNITS
    return tol.MAGNITUDE_MARGIN * (units * _U * (1.0 + EXP2_WIDE_UNITS * _U) * (1.0 + 2.0 * chain) + _U)


@functools.lru_cache(maxsize=256)
def backward_coefficients(T: int, S: int, H: int, G: int, dtype: str, block_m: int, block_n: int,
                          fwd_block_n: int) -> BackwardCoefficients:
    """The :class:`BackwardCoefficients` of one launch: T queries and S keys per head, G query
    heads per kv head, tiles of ``block_m`` queries and ``block_n`` keys (the forward's tiles
    had ``fwd_block_n`` keys)."""
    key_tiles = math.ceil(max(S, 1) / block_n)
    query_tiles = G * math.ceil(max(T, 1) / block_m)
    s0, smu = softmax_coefficients(S, block_n, fwd_block_n)
    sigma = tol.fused_vcol_scale(dtype, H)
    d = tol.MAGNITUDE_MARGIN * (2.0 * _G(H) + 4.0 * _U)  # two dot products of H terms, in any order
    return BackwardCoefficients(
        qk_row=_product_check(H, block_n, key_tiles, dtype),
        qk_col=_product_check(H, block_m, query_tiles, dtype),
        dp_row=_product_check(H, block_n, key_tiles, dtype),
        dp_col=_product_check(H, block_m, query_tiles, dtype),
        softmax0=s0, softmax_mu=smu,
        dq=_gradient_check(S, H, dtype),
        dk=_gradient_check(G * T, H, dtype),
        dv=_gradient_check(G * T, H, dtype),
        d=d,
        ds=ds_coefficient(),
        softmax_col=softmax_col_coefficient(block_m, query_tiles),
        allow_row=tol.underflow_allowance(4 * (S + 1) * (H + 1)),
        allow_col=tol.underflow_allowance(4 * (G * T + 1) * (H + 1)),
        sigma=sigma,
        # p ≤ (1 + u_in)·p̃, and the magnitude's own parts and sums (u_in covers them)
        mag_up=1.0 + 2.0 * tol.UNIT_ROUNDOFF[dtype],
        # the three parts of the prediction and the three of the magnitude: each may fall below the
        # normal range (absolute error UNDERFLOW_IN, scaled by σ)
        under=6.0 * tol.UNDERFLOW_IN[dtype] / sigma,
        p_under=tol.UNDERFLOW_IN[dtype],
    )
