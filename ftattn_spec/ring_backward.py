"""The checked backward of ring attention: its checks, thresholds and fault sites, for both backends.

The backward passes each key and value chunk around the ring once more, with the accumulators
``dK`` and ``dV`` of that chunk beside it. At step ``r`` device ``d`` holds chunk ``j`` and, from
its query rows and the forward's merged log-sum-exp, forms (working precision: float32, float64
for float64 inputs)

    A = Q Kⱼᵀ,  P = exp(scale·A − lse),  dP = dO Vⱼᵀ,  dS = P ∘ (dP − D),
    G = dS Kⱼ (dQ += scale·G),  Gₖ = dSᵀ Q (dKⱼ += scale·Gₖ),  dVⱼ += Pᵀ dO.

Checks (``docs/tolerances.md``, "The ring's backward"); every one compares a sum of a product's
output with the same sum predicted from a summed operand, per step, except the softmax's, which
adds its sums over the steps:

* per query row: ``bwd_qk_row`` (Σⱼ A against q·Σⱼ kⱼ), ``bwd_dp_row`` (Σⱼ dP against
  do·Σⱼ vⱼ), ``bwd_ds`` (Σⱼ dS against Σⱼ p·dp − D·Σⱼ p, a second evaluation), ``bwd_dq``
  (Σₕ G against dS·Σₕ k), and ``bwd_softmax`` (Σ over every step of Σⱼ p against 1: a
  corrupted log-sum-exp or exponential);
* per key: ``bwd_dk`` (Σₕ Gₖ against dSᵀ·Σₕ q), ``bwd_dv`` (Σₕ Pᵀ dO against Pᵀ·Σₕ do), and
  ``bwd_transit``: each accumulator travels with its row sums ``Σₕ dK`` and their magnitude,
  updated from each step's contribution; the accumulator as received at each step, and as it
  comes home, is checked against them, so a gradient corrupted in memory or in transit is seen.

Faults (:class:`ftattn_spec.ring.RingFault` with a site of :data:`SITES`) corrupt one element of
one step: a product's output before it is used (``bwd_scores`` is A, ``bwd_dq``/``bwd_dk``
the products G, Gₖ before their scale, folded over a kv head's query heads for ``bwd_dk`` and
``bwd_dv``), or an accumulator as a step receives it (``bwd_dk_acc``, ``bwd_dv_acc``).
"""

from __future__ import annotations

from . import tolerances as tol

#: Where a fault in the ring's backward can land.
SITES: tuple[str, ...] = ("bwd_scores", "bwd_probs", "bwd_dp", "bwd_ds", "bwd_dq", "bwd_dk", "bwd_dv",
                          "bwd_dk_acc", "bwd_dv_acc")

#: Logical axes of each site's global index (a key's for the per-key sites).
SITE_AXES: dict[str, str] = {"bwd_scores": "BNTS", "bwd_probs": "BNTS", "bwd_dp": "BNTS", "bwd_ds": "BNTS",
                             "bwd_dq": "BNTH", "bwd_dk": "BKSH", "bwd_dv": "BKSH", "bwd_dk_acc": "BKSH",
                             "bwd_dv_acc": "BKSH"}

#: The checks, per query row ``(B, N, T)`` and per key ``(B, K, S)``.
ROW_CHECKS: tuple[str, ...] = ("bwd_qk_row", "bwd_dp_row", "bwd_ds", "bwd_dq", "bwd_softmax")
KEY_CHECKS: tuple[str, ...] = ("bwd_dk", "bwd_dv", "bwd_transit")
CHECKS: tuple[str, ...] = ROW_CHECKS + KEY_CHECKS

#: Which check sees a fault at each site.
SITE_CHECKS: dict[str, tuple[str, ...]] = {
    "bwd_scores": ("bwd_qk_row",), "bwd_probs": ("bwd_softmax",), "bwd_dp": ("bwd_dp_row",),
    "bwd_ds": ("bwd_ds",), "bwd_dq": ("bwd_dq",), "bwd_dk": ("bwd_dk",), "bwd_dv": ("bwd_dv",),
    "bwd_dk_acc": ("bwd_transit",), "bwd_dv_acc": ("bwd_transit",)}


def unit(dtype: str, tf32: bool = False) -> float:
    """The unit roundoff of the backward's products: float32's (TF32's where float32 products run
    on TF32 tensor cores); float64 inputs are held to float32's, an upper bound."""
    return tol.U_TF32 if tf32 and dtype == "float32" else tol.U_ACC


def _gamma(n: int, u: float) -> float:
    return tol.gamma(max(int(n), 1)) * (u / tol.U_ACC)


def product_threshold(inner: int, width: int, magnitude, u: float = tol.U_ACC):
    """Bound on ``|Σₕ Cᵢₕ − aᵢ·(B·1)|`` for ``C = A·B`` with ``inner`` terms per element and
    ``width`` columns summed, ``magnitude`` ``Σₖ |aᵢₖ|·Σₕ |Bₖₕ|`` (any array type).

    Each element of ``C`` is off by ``γ(inner)·Σₖ|aᵢₖ||Bₖₕ|`` (``u`` the products' unit), their
    sum adds ``γ(width)`` of ``Σₕ|Cᵢₕ|``; on the other side ``B·1`` is off by ``γ(width)`` of
    ``Σₕ|Bₖₕ|`` and its product with ``aᵢ`` by ``γ(inner)``. Every term is bounded by the
    magnitude (to first order; the factor ``1 + γ`` covers the rest), plus one underflow per
    operation."""
    g = _gamma(inner, u) + _gamma(width, tol.U_ACC)
    coefficient = tol.MAGNITUDE_MARGIN * 2.0 * g * (1.0 + g)
    return coefficient * magnitude + tol.underflow_allowance(2 * (max(int(inner), 1) + 1) * (max(int(width), 1) + 1))


def ds_threshold(keys: int, magnitude):
    """Bound on ``|Σⱼ dSᵢⱼ − (Σⱼ pᵢⱼ·dpᵢⱼ − Dᵢ·Σⱼ pᵢⱼ)|`` over ``keys`` keys, ``magnitude``
    ``Σⱼ pᵢⱼ·(|dpᵢⱼ| + |Dᵢ|)``: each ``dS`` term rounds twice (a difference, a product), each
    ``p·dp`` and ``D·Σp`` once, the three sums ``γ(keys)`` of their magnitudes, the final
    difference once."""
    g = _gamma(keys, tol.U_ACC)
    coefficient = tol.MAGNITUDE_MARGIN * (4.0 * tol.U_ACC + 3.0 * g) * (1.0 + g)
    return coefficient * magnitude + tol.underflow_allowance(6 * max(int(keys), 1))


def softmax_threshold(S: int, argument_error, logit_magnitude, lse_magnitude, lse_error, total):
    """Bound on ``|Σⱼ pᵢⱼ − 1|`` over all ``S`` keys (``P`` steps) of a row that attends some key.

    ``p = exp(scale·a − lse)``: the argument is off by ``argument_error`` (the caller's
    ``scale·γ(H)·Σₕ|qᵢₕ|·maxⱼₕ|kⱼₕ|``, the error of ``a``) plus one rounding of the scaling and
    one of the difference (``2u·(μ + |lse|)``, ``μ`` = ``logit_magnitude``, the row's largest
    attended ``|scale·a|``); the exponential adds ``EXP_ERROR_UNITS·u``. The forward's merged
    log-sum-exp is itself off from the exact one by at most what its checks allow, ``lse_error``
    (the caller's: :func:`ftattn_spec.ring.lse_threshold` of one block over ``S`` keys, plus the
    ``P`` merges' :func:`ftattn_spec.ring.weight_threshold`). The sum adds ``γ(S)``. All of it
    relative to ``total`` (the row's computed ``Σⱼ p``, at least 1 to first order), plus one
    underflow per key."""
    x = argument_error + 2.0 * tol.U_ACC * (logit_magnitude + lse_magnitude) + lse_error
    rel = x * (1.0 + x) + tol.EXP_ERROR_UNITS * tol.U_ACC + _gamma(S, tol.U_ACC)
    return tol.MAGNITUDE_MARGIN * rel * (1.0 + rel) * total + tol.underflow_allowance(2 * max(int(S), 1))


def argument_error(H: int, scale: float, q_abs_sum, k_abs_max, u: float = tol.U_ACC):
    """The error of ``scale·a`` from the product ``a = q·k`` over ``H`` terms: ``γ(H)`` of
    ``scale·Σₕ|qₕ||kₕ|`` ≤ ``scale·Σₕ|qₕ|·max|k|``."""
    return scale * _gamma(H, u) * q_abs_sum * k_abs_max


def transit_threshold(H: int, P: int, magnitude):
    """Bound on ``|Σₕ dKₕ − c|``, ``c`` the carried sum of the steps' ``Σₕ`` contributions and
    ``magnitude`` the carried sum of ``Σₕ |contribution|``: the accumulator rounds once per step
    (``γ(P)``), each ``Σₕ`` of a contribution and of the accumulator ``γ(H)``, the carried sums
    ``γ(P)`` again."""
    g = 2.0 * (_gamma(H, tol.U_ACC) + _gamma(P, tol.U_ACC))
    return tol.MAGNITUDE_MARGIN * g * (1.0 + g) * magnitude + tol.underflow_allowance(4 * (max(int(H), 1) + int(P)))


__all__ = ["SITES", "SITE_AXES", "ROW_CHECKS", "KEY_CHECKS", "CHECKS", "SITE_CHECKS", "unit", "product_threshold",
           "ds_threshold", "softmax_threshold", "argument_error", "transit_threshold"]
