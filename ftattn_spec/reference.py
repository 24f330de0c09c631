"""A readable float64 NumPy oracle for attention, its checks and its error bound.

Used by the tests of both backends and by ``compare`` to judge outputs. It works
in the logical layout ``BNTH`` (query) / ``BKSH`` (key, value); ``layout=``
names the layout of the arrays passed in (``"jax"`` or ``"torch"``).
"""

from __future__ import annotations

import numpy as np

from .axes import LAYOUTS, transpose_perm
from .tolerances import output_coefficients


def _to_logical(q, k, v, layout: str):
    lq, lkv = LAYOUTS[layout]
    q = np.asarray(q, dtype=np.float64).transpose(transpose_perm(lq, "BNTH"))
    k = np.asarray(k, dtype=np.float64).transpose(transpose_perm(lkv, "BKSH"))
    v = np.asarray(v, dtype=np.float64).transpose(transpose_perm(lkv, "BKSH"))
    groups = q.shape[1] // k.shape[1]
    # kv head of query head n is n // groups
    return q, np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)


def causal_mask(T: int, S: int) -> np.ndarray:
    """(T, S) bool, True where query i may attend key j: upper-left aligned, j <= i."""
    return np.arange(S)[None, :] <= np.arange(T)[:, None]


def attention(q, k, v, *, scale=None, is_causal=False, layout="torch"):
    """Exact (float64) attention. Returns ``(out, probs, logits)``.

    ``out`` has the layout of ``q``; ``probs`` and ``logits`` are ``BNTS``.
    """
    q, k, v = _to_logical(q, k, v, layout)
    H = q.shape[-1]
    scale = H**-0.5 if scale is None else float(scale)
    s = np.einsum("bnth,bnsh->bnts", q, k) * scale
    if is_causal:
        s = np.where(causal_mask(s.shape[-2], s.shape[-1]), s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    e = np.exp(s - m)
    p = e / e.sum(axis=-1, keepdims=True)
    o = np.einsum("bnts,bnsh->bnth", p, v)
    lq, _ = LAYOUTS[layout]
    return o.transpose(transpose_perm("BNTH", lq)), p, s


def output_bound(q, k, v, probs, out_ref, *, dtype: str, scale=None, is_causal=False,
                 layout="torch", tf32=False):
    """Per-element bound on |out − out_ref| for a backend run in ``dtype``.

    ``probs`` and ``out_ref`` come from :func:`attention` on the same inputs.
    See ``ftattn_spec.tolerances.output_coefficients`` for the terms.
    """
    q, k, v = _to_logical(q, k, v, layout)
    T, S, H = q.shape[2], k.shape[2], q.shape[3]
    scale = H**-0.5 if scale is None else float(scale)
    a, b, c, d = output_coefficients(dtype, S, H, tf32)
    W = np.einsum("bnts,bnsh->bnth", probs, np.abs(v))
    A = np.einsum("bnth,bnsh->bnts", np.abs(q), np.abs(k)) * scale
    if is_causal:
        A = np.where(causal_mask(T, S), A, 0.0)
    D = A.max(axis=-1)[..., None]
    mask = causal_mask(T, S) if is_causal else np.ones((T, S), bool)
    V = np.einsum("ts,bnsh->bnth", mask.astype(np.float64), np.abs(v))
    lq, _ = LAYOUTS[layout]
    out_logical = np.asarray(out_ref, np.float64).transpose(transpose_perm(lq, "BNTH"))
    bound = (a + b * D) * W + c * np.abs(out_logical) + d * (1.0 + V)
    return bound.transpose(transpose_perm("BNTH", lq))


def magnitudes(q, k, v, *, scale=None, is_causal=False, layout="torch"):
    """Float64 versions of the magnitude terms the thresholds multiply.

    Returns ``{"qk_row": M (BNT), "qk_col": M' (BNS), "pv_row": W (BNT),
    "softmax_dmr": E (BNT)}`` as defined in ``docs/tolerances.md``.
    """
    _, p, s = attention(q, k, v, scale=scale, is_causal=is_causal, layout=layout)
    q, k, v = _to_logical(q, k, v, layout)
    T, S, H = q.shape[2], k.shape[2], q.shape[3]
    scale = H**-0.5 if scale is None else float(scale)
    mask = causal_mask(T, S) if is_causal else np.ones((T, S), bool)
    A = np.einsum("bnth,bnsh->bnts", np.abs(q), np.abs(k)) * scale * mask
    m = s.max(axis=-1, keepdims=True)
    E = np.where(mask, p * (m - np.where(mask, s, 0.0)), 0.0).sum(-1)
    return {
        "qk_row": A.sum(-1),
        "qk_col": A.sum(-2),
        "pv_row": np.einsum("bnts,bns->bnt", p, np.abs(v).sum(-1)),
        "softmax_dmr": E,
    }


def detection_limit(site: str, thresholds: dict, probs, v, *, is_causal=False, layout="torch"):
    """Largest output change (``BNTH``, float64) that a single fault at ``site``
    can cause without any check flagging it: the *detection limit*.

    ``thresholds`` maps check name → vector-granularity threshold array of a
    report (``BNT`` for row checks, ``BNS`` for ``qk_col``, ``BNH`` for
    ``pv_col``); ``probs`` is the reference's ``BNTS`` probabilities and ``v``
    the value in ``layout``. A check with threshold τ lets through an error
    whose effect on its residual is up to 2τ (τ for the error, τ for the clean
    residual already there). Per site (``docs/tolerances.md``):

    * ``scores``: a logit error δ ≤ 2·min(τ_row,i, max_j τ_col,j) moves a
      probability by a factor within e^(±2δ), so ``(e^(2δ) − 1)·W_ih`` with
      ``W_ih = Σ_j p_ij·|v_jh|``;
    * ``probs``: an L1 error ε ≤ 2·τ_dmr moves o_ih by at most ``ε·max_j |v_jh|``;
    * ``out``: the element itself, ``2·min(τ_pv_row,i, τ_pv_col,h)``;
    * a site no check of the report sees (the inputs, or a scheme without
      that site's checks): zero, nothing is certified.
    """
    _, lkv = LAYOUTS[layout]
    v = np.asarray(v, np.float64).transpose(transpose_perm(lkv, "BKSH"))
    groups = probs.shape[1] // v.shape[1]
    v = np.repeat(v, groups, axis=1)
    B, N, T, S = probs.shape
    H = v.shape[-1]
    th = {k: np.asarray(x, np.float64) for k, x in thresholds.items()}
    none = np.zeros((B, N, T, H))
    if site == "scores":
        lim = [2 * th["qk_row"]] if "qk_row" in th else []
        if "qk_col" in th:
            lim.append(np.broadcast_to(2 * th["qk_col"].max(-1, keepdims=True), (B, N, T)))
        if not lim:
            return none
        delta = np.minimum.reduce(lim)[..., None]
        return np.expm1(2 * delta) * np.einsum("bnts,bnsh->bnth", probs, np.abs(v))
    if site == "probs":
        if "softmax_dmr" not in th:
            return none
        mask = causal_mask(T, S) if is_causal else np.ones((T, S), bool)
        vmax = np.where(mask[None, None, :, :, None], np.abs(v)[:, :, None], 0.0).max(-2)  # B N T H
        return 2 * th["softmax_dmr"][..., None] * vmax
    if site == "out":
        lim = [np.broadcast_to(2 * th["pv_row"][..., None], (B, N, T, H))] if "pv_row" in th else []
        if "pv_col" in th:
            lim.append(np.broadcast_to(2 * th["pv_col"][:, :, None, :], (B, N, T, H)))
        return np.minimum.reduce(lim) if lim else none
    return none
