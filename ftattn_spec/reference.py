"""A readable float64 NumPy oracle for attention, its checks and its error bound.

Used by the tests of both backends and by ``compare`` to judge outputs. It works
in the logical layout ``BNTH`` (query) / ``BKSH`` (key, value); ``layout=``
names the layout of the arrays passed in (``"jax"`` or ``"torch"``).

Every function takes the mask keywords of ``ftattn_spec.masking``: ``mask``
(bool, broadcastable to ``BNTS``), ``bias`` (added to the logits), ``window``
(``(left, right)``), ``query_lengths``, ``key_lengths`` (``(B,)``) and
``empty`` (``"zero"`` or ``"uniform"``: how a fully masked row is filled).
"""

from __future__ import annotations

import numpy as np

from . import exp_checksum, masking
from .axes import LAYOUTS, transpose_perm
from .tolerances import U_ACC, output_coefficients


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


def _allowed(q, k, is_causal, mask=None, window=None, query_lengths=None, key_lengths=None, **_):
    B, N, T, _ = q.shape
    return masking.allowed(B, N, T, k.shape[2], mask=mask, is_causal=is_causal, window=window,
                           query_lengths=query_lengths, key_lengths=key_lengths)


def _bias(bias, shape):
    if bias is None:
        return np.zeros(shape)
    b = np.asarray(bias, np.float64)
    return np.broadcast_to(b.reshape((1,) * (4 - b.ndim) + b.shape), shape)


def attention(q, k, v, *, scale=None, is_causal=False, layout="torch", mask=None, bias=None, window=None,
              query_lengths=None, key_lengths=None, empty="zero"):
    """Exact (float64) attention. Returns ``(out, probs, logits)``.

    ``out`` has the layout of ``q``; ``probs`` and ``logits`` are ``BNTS``, the
    logits ``scale·QKᵀ + bias`` with masked entries at ``-inf``.
    """
    q, k, v = _to_logical(q, k, v, layout)
    H = q.shape[-1]
    scale = H**-0.5 if scale is None else float(scale)
    a = _allowed(q, k, is_causal, mask, window, query_lengths, key_lengths)
    s = np.einsum("bnth,bnsh->bnts", q, k) * scale + _bias(bias, a.shape)
    s = np.where(a, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        e = np.where(a, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
    d = e.sum(axis=-1, keepdims=True)
    p = e / np.where(d > 0, d, 1.0)
    if empty == "uniform":  # jax.nn: a fully masked row spreads over every key
        live = masking.live_rows(q.shape[0], q.shape[2], query_lengths)
        p = np.where(live & ~a.any(-1, keepdims=True), 1.0 / a.shape[-1], p)
    o = np.einsum("bnts,bnsh->bnth", p, v)
    lq, _ = LAYOUTS[layout]
    return o.transpose(transpose_perm("BNTH", lq)), p, s


def output_bound(q, k, v, probs, out_ref, *, dtype: str, scale=None, is_causal=False,
                 layout="torch", tf32=False, **masks):
    """Per-element bound on |out − out_ref| for a backend run in ``dtype``.

    ``probs`` and ``out_ref`` come from :func:`attention` on the same inputs.
    See ``ftattn_spec.tolerances.output_coefficients`` for the terms; a bias
    adds one float32 rounding of each logit, ``u·|l_ij|``, to the logit error.
    """
    q, k, v = _to_logical(q, k, v, layout)
    S, H = k.shape[2], q.shape[3]
    scale = H**-0.5 if scale is None else float(scale)
    a, b, c, d = output_coefficients(dtype, S, H, tf32)
    W = np.einsum("bnts,bnsh->bnth", probs, np.abs(v))
    a_mask = _allowed(q, k, is_causal, **masks)
    A = np.einsum("bnth,bnsh->bnts", np.abs(q), np.abs(k)) * scale
    if masks.get("bias") is not None:
        logits = np.einsum("bnth,bnsh->bnts", q, k) * scale + _bias(masks["bias"], a_mask.shape)
        a_mask = a_mask & np.isfinite(logits)  # a -inf bias removes the key like a mask
        A = A + 2.0 * U_ACC * np.abs(np.where(a_mask, logits, 0.0)) / b  # in units of b: b·A covers the bias rounding
    A = np.where(a_mask, A, 0.0)
    D = A.max(axis=-1)[..., None]
    V = np.einsum("bnts,bnsh->bnth", (probs > 0).astype(np.float64), np.abs(v))
    lq, _ = LAYOUTS[layout]
    out_logical = np.asarray(out_ref, np.float64).transpose(transpose_perm(lq, "BNTH"))
    bound = (a + b * D) * W + c * np.abs(out_logical) + d * (1.0 + V)
    return bound.transpose(transpose_perm("BNTH", lq))


def magnitudes(q, k, v, *, scale=None, is_causal=False, layout="torch", **masks):
    """Float64 versions of the magnitude terms the thresholds multiply.

    Returns ``{"qk_row": M (BNT), "qk_col": M' (BNS), "pv_row": W (BNT),
    "softmax_dmr": E (BNT), "logits": μ (BNT)}`` as defined in ``docs/tolerances.md``
    (``μ`` over every attended entry, which bounds the backends' ``μ`` over the
    entries with a nonzero probability).
    """
    _, p, s = attention(q, k, v, scale=scale, is_causal=is_causal, layout=layout, **masks)
    q, k, v = _to_logical(q, k, v, layout)
    H = q.shape[3]
    scale = H**-0.5 if scale is None else float(scale)
    mask = _allowed(q, k, is_causal, **masks)
    A = np.einsum("bnth,bnsh->bnts", np.abs(q), np.abs(k)) * scale * mask
    m = s.max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        E = np.where(mask & np.isfinite(s), p * (m - np.where(mask, s, 0.0)), 0.0).sum(-1)
    return {
        "qk_row": A.sum(-1),
        "qk_col": A.sum(-2),
        "pv_row": np.einsum("bnts,bns->bnt", p, np.abs(v).sum(-1)),
        "softmax_dmr": E,
        "logits": np.where(mask & np.isfinite(s), np.abs(s), 0.0).max(-1),
    }


def _exp_limit(probs, logits, vmax, width: int):
    """The ``probs`` detection limit of ``softmax_exp``: an undetected fault moves log₂ p_ij by at
    most 2τ_i (τ_i the row's largest tile bound, ``exp_checksum``, here from the exact
    probabilities and ``width`` keys per tile, the widest any implementation uses), so p_ij by
    a factor within 2^(±2τ_i); o_ih moves by at most that times 2·max_j |v_jh| (the
    renormalisation of a fused kernel's row sum doubles it), plus 2⁻⁶³·max_j |v_jh| for a
    probability that stays under the clamp."""
    B, N, T, S = probs.shape
    with np.errstate(divide="ignore"):
        lp = np.where(probs > 0, np.clip(np.log2(np.where(probs > 0, probs, 1.0)), -exp_checksum.CLAMP, 0.0), 0.0)
    tiles = -(-S // width)
    lp = np.pad(lp, [(0, 0)] * 3 + [(0, tiles * width - S)]).reshape(B, N, T, tiles, width)
    A = -lp.sum(-1)
    mu = np.zeros((B, N, T)) if logits is None else np.where(
        np.isfinite(logits), np.abs(logits), 0.0).max(-1) * np.log2(np.e)
    tau = exp_checksum.tile_threshold(exp_checksum.exp_coefficients(width, S, normalised=True), A,
                                      mu[..., None]).max(-1)
    return (np.expm1(2 * tau * np.log(2.0))[..., None] * 2 + 2.0**-63) * vmax


def detection_limit(site: str, thresholds: dict, probs, v, *, is_causal=False, layout="torch", logits=None,
                    exp_width: int = 128):
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
    * ``probs``: an L1 error ε ≤ 2·τ_dmr moves o_ih by at most ``ε·max_j |v_jh|``; under
      ``softmax_exp`` see :func:`_exp_limit` (``logits``: the reference's ``BNTS`` logits, for
      the bound's μ term); with both checks, the smaller limit;
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
        if "softmax_dmr" not in th and "softmax_exp" not in th:
            return none
        # an error can land on any key the row attends, or could attend
        mask = causal_mask(T, S) if is_causal else np.ones((T, S), bool)
        vmax = np.where(mask[None, None, :, :, None], np.abs(v)[:, :, None], 0.0).max(-2)  # B N T H
        lim = [2 * th["softmax_dmr"][..., None] * vmax] if "softmax_dmr" in th else []
        if "softmax_exp" in th:
            lim.append(_exp_limit(np.asarray(probs, np.float64), logits, vmax, exp_width))
        return np.minimum.reduce(lim)
    if site == "out":
        lim = [np.broadcast_to(2 * th["pv_row"][..., None], (B, N, T, H))] if "pv_row" in th else []
        if "pv_col" in th:
            lim.append(np.broadcast_to(2 * th["pv_col"][:, :, None, :], (B, N, T, H)))
        return np.minimum.reduce(lim) if lim else none
    return none
