"""The tolerance model: every verdict threshold in ftattn comes from here.

The derivation is in ``docs/tolerances.md``; this module holds its constants and
turns them into plain Python coefficients. A backend computes the data-dependent
magnitude of each check (for example ``M_i = scale·Σ_h |q_ih|·Σ_j |k_jh|``) in
float32 and multiplies it by the coefficient returned here, so both backends
apply the same model.

Notation: ``u`` is the unit roundoff (half the machine epsilon) of a format;
``γ(n)`` bounds the relative error of a float32 accumulation of ``n`` terms
measured against the sum of the terms' magnitudes.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

#: Unit roundoff of the input/storage formats ftattn accepts. float64 inputs
#: are computed in float64 (the unfused path only), but the checks' side sums
#: run in float32 like every other dtype's, so the model judges them as float32
#: inputs: their float64 rounding is far below every term (an upper bound).
UNIT_ROUNDOFF: dict[str, float] = {
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
    "float32": 2.0**-24,
    "float64": 2.0**-24,
}

#: Every accumulation, softmax and checksum runs in float32.
U_ACC: float = 2.0**-24

#: Unit roundoff of TF32 (10 explicit mantissa bits), used when a backend lets
#: float32 matrix products run on TF32 tensor cores.
U_TF32: float = 2.0**-11

#: Confidence factor of the probabilistic bound λ·√n·u (Higham & Mary, 2019):
#: the bound fails with probability at most 2·n·exp(-λ²/2) per accumulation
#: *when rounding errors are independent and mean zero*.
LAMBDA: float = 6.0

#: Weight of the linear term of γ(n), in units of n·u. Rounding errors that
#: are not independent (correlated data such as many equal terms, or tensor
#: cores that truncate instead of rounding) grow linearly with the length of the
#: accumulation chain. Measured on an H100 (PyTorch 2.11 and JAX 0.11.2) with
#: constant inputs, T = S = 8192: a row of O = P·V was off by about n/4·u of
#: Σ|terms| on each side of the check; a sequential round-to-nearest sum of
#: equal terms reaches n/2·u. The deterministic worst case is n·u.
LINEAR: float = 0.5

#: Relative error of the float32 ``exp``/``exp2`` implementations, in units of
#: ``U_ACC`` (16u = 8 ulp; CUDA documents 2 ulp for expf, XLA:CPU's polynomial
#: is within 1 ulp).
EXP_ERROR_UNITS: float = 16.0

#: The magnitude terms are themselves float32 sums of non-negative numbers, so
#: they carry a relative error of at most γ(n) ≪ 2⁻¹⁰ for n < 2²⁰; every
#: threshold is scaled up by this factor to cover it.
MAGNITUDE_MARGIN: float = 1.0 + 2.0**-10

#: Smallest normal float32. Below it, GPUs flush results to zero (an absolute
#: error up to this size per operation) and CPUs round to subnormals, so each
#: threshold also allows this much absolute error per operation it covers.
TINY: float = 2.0**-126


def gamma(n: int) -> float:
    """Relative error bound of a float32 accumulation of ``n`` terms.

    ``γ(n) = u·(λ·√n + LINEAR·n)``: the probabilistic bound for independent
    rounding errors in any order of accumulation, plus a linear term for
    correlated ones (see ``LINEAR``).
    """
    n = max(int(n), 1)
    return U_ACC * (LAMBDA * math.sqrt(n) + LINEAR * n)


def reduction_block(n: int) -> int:
    """Inner length of the two-level sums the checks use over a long axis of ``n``.

    The checksums' own sums over keys or queries (row and column sums of S, the
    sums of K and Q and their prefix sums) add ``reduction_block(n)`` terms at a
    time and then add those partial sums. Each level adds at most about √n
    terms (a power of two, so that common lengths need no padding), which
    bounds the error by :func:`blocked_gamma` instead of ``gamma(n)``: for
    n = 8192, 322u instead of 4639u, because the linear term that covers
    correlated rounding grows with the longest chain of additions.
    """
    return 1 << math.ceil(math.log2(math.sqrt(max(int(n), 1))))


def blocked_gamma(n: int) -> float:
    """Error bound of a two-level sum of ``n`` terms (see :func:`reduction_block`).

    The outer level counts one term more than there are blocks: a prefix sum
    adds its block's inner prefix to the sum of the blocks before it.
    """
    b = reduction_block(n)
    g1, g2 = gamma(b), gamma(math.ceil(max(int(n), 1) / b) + 1)
    return g1 + g2 + g1 * g2


def underflow_allowance(n_ops: int) -> float:
    """Absolute error allowance for ``n_ops`` operations that may underflow."""
    return float(n_ops) * TINY


def threshold(coefficient: float, magnitude, n: int, H: int):
    """``coefficient·magnitude`` plus the underflow allowance of a check whose two
    sides together perform about ``4·(n+1)·(H+1)`` operations.

    ``magnitude`` may be any array type (NumPy, JAX, PyTorch): only ``*`` and
    ``+`` are applied to it.
    """
    return coefficient * magnitude + underflow_allowance(4 * (n + 1) * (H + 1))


def product_roundoff(dtype: str, tf32: bool = False) -> float:
    """Relative error of one product ``a·b`` of two ``dtype`` inputs inside a GEMM.

    float16 and bfloat16 values are exact in float32 and in TF32, so their
    products are exact. float32 products round once (``u``), or twice at TF32
    precision when the backend lets matrix products use TF32.
    """
    if dtype not in UNIT_ROUNDOFF:
        raise ValueError(f"dtype: expected one of {tuple(UNIT_ROUNDOFF)}, got {dtype!r}")
    if dtype not in ("float32", "float64"):
        return 0.0
    return 2.0 * U_TF32 + U_TF32**2 if tf32 else U_ACC


def qk_coefficient(n_reduce: int, H: int, dtype: str, tf32: bool = False, masked: bool = False) -> float:
    """Coefficient ``c`` of the S = scale·QKᵀ checksum threshold ``c·M``.

    For ``qk_row`` ``n_reduce = S`` and ``M_i = scale·Σ_h |q_ih|·Σ_j |k_jh|``;
    for ``qk_col`` ``n_reduce = T`` and ``M_j = scale·Σ_h (Σ_i |q_ih|)·|k_jh|``.
    Terms: each s_ij's dot product (γ(H), tensor cores) and product rounding;
    the two-level sum of S over the checked axis (blocked γ(n)); the two-level
    sum of K (or Q) for the prediction (blocked γ(n)); the prediction's dot
    product (γ(H)); three float32 roundings (the scale multiply on each side and
    the prediction's products).

    With ``masked=True`` (a general mask: the prediction sums the attended
    keys or queries with a float32 matrix product of the 0/1 mask, whose
    accumulation order is the library's), the prediction's sum is bounded by
    γ(n) instead of the blocked γ(n), plus the rounding of its products (exact
    unless the backend lets float32 products use TF32).
    """
    prediction = gamma(n_reduce) + product_roundoff("float32", tf32) if masked else blocked_gamma(n_reduce)
    return MAGNITUDE_MARGIN * (
        2.0 * gamma(H) + blocked_gamma(n_reduce) + prediction + 3.0 * U_ACC + product_roundoff(dtype, tf32)
    )


def pv_coefficient(S: int, H: int, dtype: str, tf32: bool = False) -> float:
    """Coefficient ``c`` of the O = P·V row-checksum threshold ``c·W_i``.

    ``W_i = Σ_j p̂_ij·Σ_h |v_jh|`` with ``p̂`` the probabilities as fed to the
    GEMM. Terms: the GEMM's accumulation over keys (γ(S), in the library's
    order) and its products; the sum of O over H (γ(H)); V·1 (γ(H)); the
    prediction P̂·(V·1), float32 products summed in two levels (blocked γ(S)
    and the products' rounding).
    """
    return MAGNITUDE_MARGIN * (
        gamma(S)
        + blocked_gamma(S)
        + 2.0 * gamma(H)
        + product_roundoff(dtype, tf32)
        + product_roundoff("float32", tf32)
    )


def pv_col_coefficient(T: int, S: int, dtype: str, tf32: bool = False) -> float:
    """Coefficient ``c`` of the O = P·V column-checksum threshold ``c·W'_h``.

    The check compares ``Σ_i o_ih`` with ``Σ_j c_j·v_jh``, ``c_j = Σ_i p̂_ij``
    (the column sums of P̂), and ``W'_h = Σ_j c_j·|v_jh|``. Terms: each o_ih's
    accumulation over keys (γ(S)) and its products; the two-level sum of O
    over the T rows (blocked γ(T)); the two-level column sums of P̂ (blocked
    γ(T)); the prediction's float32 products and two-level sum over keys
    (blocked γ(S)).
    """
    return MAGNITUDE_MARGIN * (
        gamma(S)
        + 2.0 * blocked_gamma(T)
        + blocked_gamma(S)
        + product_roundoff(dtype, tf32)
        + product_roundoff("float32", tf32)
    )


def dmr_threshold(S: int) -> float:
    """Threshold on the L1 distance Σ_j |p_ij − p'_ij| between the two softmax replicas.

    Per element, each replica's relative error is at most
    ``(c_exp + 2)·u + 2u·(m_i − s_ij)`` plus its denominator's: the exponential,
    the normalisation (one division, or a reciprocal and a product), and an
    argument off by ``2u·(m_i − s_ij)`` (the subtraction of the row max ``m_i``
    and the multiply by log₂ e). The denominators are sums of S positive
    terms: the first replica's in the library's order (γ(S)), the second's in
    two levels (blocked γ(S)). Summed over the row with Σ_j p_ij = 1:

    ``u·(2·c_exp + 4) + γ(S) + γ₂(S) + 4u·E_i``, ``E_i = Σ_j p_ij·(m_i − s_ij)``,

    and ``E_i = H(p_i) − ln Σ_j e^(s_ij − m_i) ≤ H(p_i) ≤ ln S`` (the entropy of
    the row, minus a log of a sum whose largest term is 1), so the threshold
    needs no data: it depends on S alone.
    """
    S = max(int(S), 1)
    bound = U_ACC * (2.0 * EXP_ERROR_UNITS + 4.0 + 4.0 * math.log(S)) + gamma(S) + blocked_gamma(S)
    return MAGNITUDE_MARGIN * bound + underflow_allowance(4 * S)


#: Per-replica error of the exponent arguments from evaluating a logit twice,
#: in units of ``U_ACC·μ_i`` (see :func:`dmr_logit_coefficient`).
DMR_LOGIT_UNITS: float = 4.0


def dmr_logit_coefficient() -> float:
    """Coefficient ``κ`` of the logit-magnitude term ``2·expm1(2κ·μ_i)`` of the
    unfused ``softmax_dmr`` threshold.

    :func:`dmr_threshold` assumes both replicas and their row maxima read one
    stored value of each logit. A compiler need not keep it so: XLA re-forms
    ``l = scale·x (+ bias)`` inside every fusion that reads it and may contract
    the product with the following subtraction into a fused multiply-add, so
    one evaluation of ``l_ij`` may differ from another by a rounding of
    ``|scale·x_ij|`` and one of ``|l_ij|``, each at most ``u·μ_i`` with
    ``μ_i = max_j max(|scale·x_ij|, |l_ij|)`` over the entries where either
    replica's probability is nonzero (the other entries add nothing to the L1
    distance). An argument ``l_ij − m_i`` is then off by at most
    ``κ·u·μ_i`` (``κ = 4``: two roundings for ``l_ij``, two for the maximum),
    each replica's probabilities by a factor within ``exp(±2κ·u·μ_i)`` (the
    numerator and the row sum), and the L1 distance of the two rows, which
    each sum to 1, by at most ``2·expm1(2κ·u·μ_i)``. Both backends add this
    term, so their verdicts agree; it grows past 2 (no row can fail the check)
    only when the logits exceed about 10⁶, where no single evaluation of the
    softmax is accurate either.
    """
    return DMR_LOGIT_UNITS * U_ACC


#: Cap of that term: two rows that each sum to 1 within rounding are less than
#: 2·(1 + γ) apart in L1, so a larger term adds nothing, and a finite cap keeps
#: the threshold finite (an infinite one fails closed) at any logit magnitude.
DMR_LOGIT_CAP: float = 4.0


def global_factor(n_rows: int) -> float:
    """Factor on Σ of the vector thresholds for a ``granularity="global"`` check.

    The global residual is |Σ_i d_i| over the per-row differences d_i; summing
    them in float32 adds at most γ(n)·Σ|d_i| ≤ γ(n)·Σ thresholds.
    """
    return 1.0 + gamma(n_rows)


#: Largest absolute rounding error of a value that falls below the normal range
#: of each storage format: half the subnormal spacing for float16, and the
#: smallest normal number for formats a GPU may flush to zero.
UNDERFLOW_IN: dict[str, float] = {"float16": 2.0**-25, "bfloat16": TINY, "float32": TINY, "float64": TINY}


def output_coefficients(dtype: str, S: int, H: int, tf32: bool = False) -> tuple[float, float, float, float]:
    """``(a, b, c, d)`` of the output error bound against an exact (float64) reference.

    ``|o_ih − o*_ih| ≤ (a + b·D_i)·W_ih + c·|o*_ih| + d·(1 + V_h)`` where
    ``W_ih = Σ_j p_ij·|v_jh|`` and ``D_i = max_j scale·Σ_h |q_ih|·|k_jh|``.
    ``a``: rounding P to the input dtype, the GEMM accumulation over keys, the
    float32 softmax. ``b·D_i``: the logit error of S (a logit shift of δ moves a
    probability by a factor within e^(±2δ)). ``c``: rounding the output to the
    input dtype. ``d·(1 + V_h)``, with ``V_h = Σ_j |v_jh|`` over attended keys:
    probabilities and outputs that round below the normal range of the input
    dtype carry an absolute error up to ``d`` each.
    """
    u_in = UNIT_ROUNDOFF[dtype]
    a = u_in + gamma(S) + U_ACC * (EXP_ERROR_UNITS + 4.0) + product_roundoff(dtype, tf32)
    b = 2.0 * (gamma(H) + 2.0 * U_ACC + product_roundoff(dtype, tf32))
    return MAGNITUDE_MARGIN * a, MAGNITUDE_MARGIN * b, u_in, UNDERFLOW_IN[dtype]


# ---------------------------------------------------------------------------
# The fused kernels (``implementation="triton"``): one pass over the keys in
# tiles of ``block_n``, running sums carried across tiles and rescaled by the
# online softmax. Derivations: docs/tolerances.md, "Fused kernels".

#: Keys per chunk of the fused kernels' pre-pass sums of K (the prefix sums a
#: causal row needs are taken at multiples of this; a query block is a
#: multiple of it).
FUSED_CHUNK: int = 64


def fused_qk_coefficient(S: int, H: int, dtype: str, block_m: int, block_n: int,
                         chunk: int = FUSED_CHUNK) -> float:
    """Coefficient ``c`` of the fused ``qk_row`` threshold ``c·M_i``.

    ``M_i = scale·Σ_h |q_ih|·Σ_j |k_jh|`` over the attended keys. The actual
    side sums each tile's S row in a tree (γ(block_n)) and adds the tile sums
    in a chain (γ(tiles + 1)); the prediction sums chunks of keys (γ(chunk)),
    adds the chunk sums in a chain (γ(chunks + 1)), takes the keys of a tile
    that a row attends only in part with a 0/1 matrix product (γ(block_n) per
    partial tile, or γ(block_m) for a causal diagonal block; these tiles cover
    disjoint keys, so their chain is bounded by the same γ(chunks + 1)), and
    takes the dot product with q (γ(H) and one rounding per product); each
    s_ij is a dot product (γ(H)). Five float32 roundings remain (the sum of the
    two prediction parts, the difference, and the scale on each side).
    ``chunk`` is the number of keys per pre-pass chunk (``FUSED_CHUNK``, or
    ``block_m`` when that is smaller).
    """
    tiles = math.ceil(max(int(S), 1) / block_n)
    chunks = math.ceil(max(int(S), 1) / chunk)
    actual = gamma(block_n) + gamma(tiles + 1)
    prediction = gamma(chunk) + gamma(chunks + 1) + gamma(max(block_m, block_n))
    return MAGNITUDE_MARGIN * (2.0 * gamma(H) + actual + prediction + 5.0 * U_ACC + product_roundoff(dtype))


def fused_vcol_scale(dtype: str, H: int) -> float:
    """Power-of-two factor ``σ`` the fused kernels apply to ``v̄_j`` and ``w_j``
    before splitting them into parts of the input dtype, and undo (exactly)
    on the ``pv_row`` prediction and magnitude.

    ``|v̄_j| ≤ w_j ≤ H·max|v|`` exceeds the float16 maximum once ``|v|`` does
    ``65504 / H`` (a sum of ``H`` values near it overflowed to inf, and the
    check failed closed on clean inputs); ``σ = 2^-⌈log₂ H⌉`` keeps both below
    ``max|v|``. bfloat16 and float32 have float32's range: ``σ = 1``.
    """
    if dtype != "float16":
        return 1.0
    return 2.0 ** -math.ceil(math.log2(max(int(H), 1)))


def fused_pv_coefficients(S: int, H: int, dtype: str) -> tuple[float, float, float]:
    """``(c, c_rescale, allowance)`` of the fused ``pv_row`` threshold
    ``(c + c_rescale·r_i)·W_i + allowance``.

    ``W_i = Σ_j p̂_ij·Σ_h |v_jh| / l_i`` and ``r_i`` is the number of times row
    ``i``'s running maximum rose after the first tile (each rescales both
    sides, one rounding each; a factor of exactly 1 rounds nothing). Terms:
    the accumulation of O and of the prediction over the keys, on the tensor
    cores (γ(S) each); v̄_j = Σ_h v_jh and the row sum of O (γ(H) each); the
    three-part split of v̄ in the input dtype (relative error u³ per key, and an
    absolute one of ``UNDERFLOW_IN`` per part when a part falls below the
    normal range, in units scaled by :func:`fused_vcol_scale`, hence ``/σ``);
    the two divisions by l_i and the sums of the parts.
    """
    u_in = UNIT_ROUNDOFF[dtype]
    c = MAGNITUDE_MARGIN * (2.0 * gamma(S) + 2.0 * gamma(H) + 6.0 * U_ACC + 4.0 * u_in**3
                            + product_roundoff(dtype))
    allowance = underflow_allowance(4 * (S + 1) * (H + 1)) + 3.0 * UNDERFLOW_IN[dtype] / fused_vcol_scale(dtype, H)
    return c, MAGNITUDE_MARGIN * 2.0 * U_ACC, allowance


def fused_dmr_coefficients(S: int, block_n: int) -> tuple[float, float, float, float]:
    """``(a0, a1, a2, allowance)`` of the fused ``softmax_dmr`` threshold
    ``a0 + a1·r_i + a2·μ_i·(1 + r_i) + allowance / l_i``.

    The fused residual is ``(Σ_tiles |Σ_tile p − Σ_tile p'| + |l − l'|) / l``:
    the two replicas' tile sums and running sums, in the primary's frame.
    ``r_i`` counts the rises of the running maximum after the first tile,
    ``μ_i`` is the largest |scaled running maximum| (log₂ units). Per element
    the replicas differ by at most ``2·c_exp·u + ln 2·u·(μ + 3·|x_j|)`` (two
    exponentials; the primary's fused multiply-add of s·c − m and its rounded
    maximum, the replica's subtraction and multiply), and
    ``Σ_j p_j·|x_j|·ln 2 ≤ ln S`` as in :func:`dmr_threshold`; both terms enter
    twice (the tile sums and the running sums). The tile sums add γ(block_n)
    per replica, the running sums γ(tiles + 1) per replica; each rise of the
    maximum evaluates the two rescale factors with
    ``(2·c_exp + 2)·u + 8·ln 2·u·μ`` between them.
    """
    S = max(int(S), 1)
    tiles = math.ceil(S / block_n)
    a0 = (4.0 * EXP_ERROR_UNITS + 8.0) * U_ACC + 6.0 * U_ACC * math.log(S) + 4.0 * gamma(block_n) \
        + 2.0 * gamma(tiles + 1)
    a1 = (2.0 * EXP_ERROR_UNITS + 4.0) * U_ACC
    a2 = 8.0 * math.log(2.0) * U_ACC
    return MAGNITUDE_MARGIN * a0, MAGNITUDE_MARGIN * a1, MAGNITUDE_MARGIN * a2, underflow_allowance(4 * S)


class FusedCoefficients(NamedTuple):
    """Every threshold coefficient a fused kernel needs, computed once per shape.

    ``qk``, ``qk_allow``: :func:`fused_qk_coefficient` and the ``qk_row``
    underflow allowance; ``pv``, ``pv_rescale``, ``pv_allow``:
    :func:`fused_pv_coefficients`; ``dmr0``, ``dmr_rescale``, ``dmr_mu``,
    ``dmr_allow``: :func:`fused_dmr_coefficients`. A kernel reads them by
    name (Triton takes them as scalar arguments in this order).
    """

    qk: float
    qk_allow: float
    pv: float
    pv_rescale: float
    pv_allow: float
    dmr0: float
    dmr_rescale: float
    dmr_mu: float
    dmr_allow: float


@functools.lru_cache(maxsize=256)
def fused_coefficients(S: int, H: int, dtype: str, block_m: int, block_n: int, chunk: int) -> FusedCoefficients:
    """The :class:`FusedCoefficients` of a fused kernel with these tiles (``chunk``: keys per
    pre-pass chunk)."""
    return FusedCoefficients(fused_qk_coefficient(S, H, dtype, block_m, block_n, chunk),
                             underflow_allowance(4 * (S + 1) * (H + 1)), *fused_pv_coefficients(S, H, dtype),
                             *fused_dmr_coefficients(S, block_n))
