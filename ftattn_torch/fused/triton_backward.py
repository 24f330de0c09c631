"""Triton kernels of the fused backward (``implementation="triton"``): flash-attention style.

Import only through :mod:`ftattn_torch.fused` (it decides whether Triton compiles or
interprets). Legend of ``ftattn_spec.axes``: q ``B N T H``, k and v ``B K S H``, query head
``n`` reads kv head ``n // G``.

The forward saves ``LSE``, float32 ``(B, N, T)``: per row ``m·c_z + log2 l`` in base-2 units
of the logits (``+inf`` for a row that attends nothing), so that ``p_ij = exp2(z_ij·c_z −
LSE_i)`` is recomputed tile by tile from Q and K, never stored. Four kernels, no atomics:

``_bwd_rows`` and ``_bwd_keys`` (:mod:`.triton_backward_prepass`): D, and with ``CHECKS`` the
  checks' operand sums and weights, per query row and per key.
``_bwd_dkdv`` (grid: key blocks × ``B·K``): for its keys, over the ``G`` query heads of the
  group and the query blocks that attend them, ``dV += Pᵀ·dO`` and ``dK += dSᵀ·Q·scale`` with
  ``dS = P ∘ (dO·Vᵀ − D)``: dK and dV are summed over the group inside one program. Its tiles
  are transposed (keys × queries), so that the checks' sums over queries stay within a warp.
``_bwd_dq`` (grid: query blocks × ``B·N``): ``dQ += dS·K·scale`` over the keys its rows
  attend; with ``STORE_DS`` it also writes ``dS`` (the bias gradient, float32 ``(B, N, T, S)``,
  only when a bias needs one).

With ``CHECKS`` both kernels verify each product by a row (or key) sum predicted from a summed
operand (``ftattn_spec.backward_tolerances``); P's rows must sum to 1, and dS is compared,
summed per row (per key), with a second evaluation of each term, ``p·dp − p·D``. The
sums of S, dP, P and that difference are row sums of the tiles on the CUDA cores; the
gradients' predictions and magnitudes are products of P̃, dS̃ and |dS̃| with the weights on
the tensor cores, accumulated across tiles like the gradients themselves (on the CUDA cores,
with float32 copies of the operands held across the loop, the first checked version was
6–14× the unchecked one on the H200; docs/kernels.md). The dK/dV kernel sees a key block
only: it writes its block's total of P into ``BLOCKS`` (float32 ``(1, B·K, key blocks)``),
which the runner adds up per head group and judges against the attended rows.

Every mask form of the forward (``_keep``) applies per element; the loops visit only the
band of tiles that the window, ``is_causal`` and the lengths leave, and contain no
data-dependent branch (docs/kernels.md, "Masks": such branches miscompiled on the H200).
Memory beyond inputs, outputs and gradients: ``LSE``, ``DD`` and the operand sums, O(B·N·T).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_backward_prepass import _bwd_keys, _bwd_rows  # noqa: F401 - the launcher's
from .triton_kernel import _band, _ends, _exp2_fma, _inject, _inject_at, _keep_at, _verdict

LOG2E_B = tl.constexpr(1.4426950408889634)

# ftattn_spec.faults.SITES indices of the backward's sites
SITE_BWD_SCORES = tl.constexpr(6)
SITE_BWD_PROBS = tl.constexpr(7)
SITE_BWD_DP = tl.constexpr(8)
SITE_BWD_DS = tl.constexpr(9)
SITE_BWD_DQ = tl.constexpr(10)
SITE_BWD_DK = tl.constexpr(11)
SITE_BWD_DV = tl.constexpr(12)


@triton.jit
def _mm(a, b, UPCAST: tl.constexpr):
    """``a·b`` with float32 accumulation (operands upcast in the interpreter, whose bfloat16
    ``tl.dot`` is wrong)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _exponent(qk, r2, c2, live2, kend, win_left, win_right, lse2, c, MASK, m_off, smt, sms, BIAS, b_off, sbt, sbs,
              T, S, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The argument ``x_ij = z_ij·c_z − LSE_i`` of P's exponential for one tile of raw scores
    ``qk``, and where a mask form keeps the entry (the tile's query and key indices broadcast
    from ``r2`` and ``c2``, in either orientation)."""
    zc = qk * c
    if HAS_BIAS:
        bt = tl.load(BIAS + b_off + r2.to(tl.int64) * sbt + c2.to(tl.int64) * sbs, mask=(r2 < T) & (c2 < S),
                     other=0.0).to(tl.float32)
        zc = zc + bt * LOG2E_B
    keep = _keep_at(r2, c2, live2, kend, win_left, win_right, MASK, m_off, smt, sms, T, S, HAS_MASK)
    # clamped at 0 (p <= 1): with logits near 2^24 and beyond, the GPU contracts z·c − LSE into one
    # fused multiply-add whose result at the row maximum can be positive by half an ulp of |z·c|
    # (2^1024 at |z·c| = 2^34: inf; measured on the H200 with the "huge" inputs)
    return tl.minimum(zc - lse2, 0.0), keep


@triton.jit
def _probs(qk, r2, c2, live2, kend, win_left, win_right, lse2, c, MASK, m_off, smt, sms, BIAS, b_off, sbt, sbs,
           T, S, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr):
    """P of one tile, recomputed in float32 from the saved log-sum-exp; zero wherever a mask
    form leaves the entry out."""
    x, keep = _exponent(qk, r2, c2, live2, kend, win_left, win_right, lse2, c, MASK, m_off, smt, sms, BIAS, b_off,
                        sbt, sbs, T, S, HAS_MASK, HAS_BIAS)
    return tl.where(keep, tl.math.exp2(x), 0.0)


@triton.jit
def _mm_acc(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a·b`` on the tensor cores (upcast in the interpreter, as :func:`_mm`)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _column(acc, c0: tl.constexpr, parts: tl.constexpr):
    """The sum of columns ``c0..c0+parts-1`` of a ``(rows, 16)`` accumulator."""
    col = tl.arange(0, 16)[None, :]
    return tl.sum(tl.where((col >= c0) & (col < c0 + parts), acc, 0.0), 1)


@triton.jit
def _bwd_dkdv(Q, K, V, DO, LSE, DD, DK, DV, MASK, BIAS, QLEN, KLEN, RB, WQ, VMAX, TOTDO, STATS, FLAGS, COUNT, FT, FV, BLOCKS,
              sqb, sqn, sqt, sqh, skb, skk, sks, skh, svb, svk, svs, svh, sdb, sdn, sdt, sdh,
              skgb, skgk, skgs, skgh, svgb, svgk, svgs, svgh, smb, smn, smt, sms, sbb, sbn, sbt, sbs,
              N, G, KH, T, S, scale, win_left, win_right, bk_offset, n_faults: tl.constexpr, plane, rplane_blk,
              n_mblocks, coef_qk, coef_dp, coef_dk, coef_dv, coef_ds, coef_pc, allow, sigma, mag_up, under, p_under,
              H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_KLEN: tl.constexpr,
              CHECKS: tl.constexpr, INJECT: tl.constexpr, UPCAST: tl.constexpr):
    nb = tl.program_id(0)
    bk = tl.program_id(1) + bk_offset
    b = bk // KH
    kh = bk % KH
    c = scale * LOG2E_B
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    hs = tl.arange(0, H)
    kvalid = cols < S
    k = tl.load(K + b.to(tl.int64) * skb + kh.to(tl.int64) * skk + cols[:, None].to(tl.int64) * sks
                + hs[None, :] * skh, mask=kvalid[:, None], other=0.0)  # BLOCK_N × H
    v = tl.load(V + b.to(tl.int64) * svb + kh.to(tl.int64) * svk + cols[:, None].to(tl.int64) * svs
                + hs[None, :] * svh, mask=kvalid[:, None], other=0.0)  # BLOCK_N × H
    dt = k.dtype
    qend, kend = _ends(QLEN, KLEN, b, T, S, HAS_QLEN, HAS_KLEN)
    # the query rows that attend a key of this block: j - win_right <= i <= j + win_left
    c_lo = nb * BLOCK_N
    lo, hi = _band(c_lo, tl.minimum(c_lo + BLOCK_N, kend) - 1, qend, win_right, win_left)
    m_start = lo // BLOCK_M
    m_end = (hi + BLOCK_M - 1) // BLOCK_M
    dk = tl.zeros([BLOCK_N, H], tl.float32)
    dv = tl.zeros([BLOCK_N, H], tl.float32)
    # the checks' sums over the query rows, per key: of S, dP, P and dS; the gradients' predictions
    # and magnitudes as products with the rows' weights (e_p: P̃·W, e_d: dS̃·W, e_a: |dS̃|·W); the
    # operand sums of Q and dO over the visited query blocks
    s_act = tl.zeros([BLOCK_N], tl.float32)
    p_act = tl.zeros([BLOCK_N], tl.float32)
    e_p = tl.zeros([BLOCK_N, 16], tl.float32)
    e_d = tl.zeros([BLOCK_N, 16], tl.float32)
    e_a = tl.zeros([BLOCK_N, 16], tl.float32)
    p_tot = tl.zeros([BLOCK_N], tl.float32)
    x_dev = tl.zeros([BLOCK_N], tl.float32)
    r_tot = tl.zeros([BLOCK_N], tl.float32)
    q_sum = tl.zeros([H], tl.float32)
    q_abs = tl.zeros([H], tl.float32)
    do_sum = tl.zeros([H], tl.float32)
    do_abs = tl.zeros([H], tl.float32)
    c2 = cols[:, None]
    for g in range(G):
        n = kh * G + g
        q_off = b.to(tl.int64) * sqb + n.to(tl.int64) * sqn
        d_off = b.to(tl.int64) * sdb + n.to(tl.int64) * sdn
        r_off = (b.to(tl.int64) * N + n) * T
        m_off = b.to(tl.int64) * smb + n.to(tl.int64) * smn
        b_off = b.to(tl.int64) * sbb + n.to(tl.int64) * sbn
        for mb in range(m_start, m_end):
            rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
            rvalid = rows < T
            live = rows < qend
            r2 = rows[None, :]
            q_t = tl.load(Q + q_off + r2.to(tl.int64) * sqt + hs[:, None] * sqh, mask=rvalid[None, :],
                          other=0.0)  # H × BLOCK_M
            do = tl.load(DO + d_off + rows[:, None].to(tl.int64) * sdt + hs[None, :] * sdh, mask=rvalid[:, None],
                         other=0.0)  # BLOCK_M × H
            lse = tl.load(LSE + r_off + rows, mask=rvalid, other=float("inf"))
            di = tl.load(DD + r_off + rows, mask=rvalid, other=0.0)
            qk = _mm(k, q_t, UPCAST)  # BLOCK_N × BLOCK_M: keys × queries
            if INJECT:
                qk = _inject_at(qk, r2, c2, mb * BLOCK_M, mb * BLOCK_M + BLOCK_M - 1, c_lo, c_lo + BLOCK_N - 1,
                                FT, FV, n_faults, b, n, SITE_BWD_SCORES, 1, scale)
            x, keep = _exponent(qk, r2, c2, live[None, :], kend, win_left, win_right, lse[None, :], c, MASK, m_off,
                                smt, sms, BIAS, b_off, sbt, sbs, T, S, HAS_MASK, HAS_BIAS)
            p = tl.where(keep, tl.math.exp2(x), 0.0)
            if INJECT:
                p = _inject_at(p, r2, c2, mb * BLOCK_M, mb * BLOCK_M + BLOCK_M - 1, c_lo, c_lo + BLOCK_N - 1,
                               FT, FV, n_faults, b, n, SITE_BWD_PROBS, 1, 1.0)
            pm = p.to(dt)
            dv += _mm(pm, do, UPCAST)
            dp = _mm(v, tl.trans(do), UPCAST)
            if INJECT:
                dp = _inject_at(dp, r2, c2, mb * BLOCK_M, mb * BLOCK_M + BLOCK_M - 1, c_lo, c_lo + BLOCK_N - 1,
                                FT, FV, n_faults, b, n, SITE_BWD_DP, 1, 1.0)
            ds = p * (dp - di[None, :])
            if INJECT:
                ds = _inject_at(ds, r2, c2, mb * BLOCK_M, mb * BLOCK_M + BLOCK_M - 1, c_lo, c_lo + BLOCK_N - 1,
                                FT, FV, n_faults, b, n, SITE_BWD_DS, 1, 1.0)
            dsm = ds.to(dt)
            dk += _mm(dsm, tl.trans(q_t), UPCAST)
            if CHECKS:
                w = tl.load(WQ + (r_off + rows)[:, None] * 16 + tl.arange(0, 16)[None, :], mask=rvalid[:, None],
                            other=0.0)
                e_p = _mm_acc(pm, w, e_p, UPCAST)
                e_d = _mm_acc(dsm, w, e_d, UPCAST)
                e_a = _mm_acc(tl.abs(dsm), w, e_a, UPCAST)
                blk = ((b.to(tl.int64) * N + n) * n_mblocks + mb) * H + hs
                q_sum += tl.load(RB + blk)
                q_abs += tl.load(RB + rplane_blk + blk)
                do_sum += tl.load(RB + 2 * rplane_blk + blk)
                do_abs += tl.load(RB + 3 * rplane_blk + blk)
                s_act += tl.sum(qk, 1)
                p_act += tl.sum(dp, 1)
                # this kernel's P summed over its tiles: the runner adds the blocks of a head group
                # and compares them with the attended rows; dS against its second evaluation
                p_tot += tl.sum(p, 1)
                # bwd_softmax_col: P against a second exponential on the FMA pipe, per key and tile
                x_dev += tl.abs(tl.sum(p - tl.where(keep, _exp2_fma(x), 0.0), 1))
                r_tot += tl.sum(ds - (p * dp - p * di[None, :]), 1)
    if INJECT:
        dk = _inject(dk, cols, hs, FT, FV, n_faults, b, kh, SITE_BWD_DK, 0, scale)
        dv = _inject(dv, cols, hs, FT, FV, n_faults, b, kh, SITE_BWD_DV, 0, 1.0)
    if CHECKS:
        n_blocks = tl.num_programs(0)
        tl.store(BLOCKS + bk.to(tl.int64) * n_blocks + nb, tl.sum(p_tot, 0))
        kf = k.to(tl.float32)
        vf = v.to(tl.float32)
        s_pred = tl.sum(kf * q_sum[None, :], 1)
        s_mag = tl.sum(tl.abs(kf) * q_abs[None, :], 1)
        p_pred = tl.sum(vf * do_sum[None, :], 1)
        p_mag = tl.sum(tl.abs(vf) * do_abs[None, :], 1)
        _verdict(STATS, FLAGS, COUNT, plane, b, kh, KH, S, cols, kvalid, 0, (s_act - s_pred) * scale,
                 (coef_qk * s_mag + allow) * scale, False)
        _verdict(STATS, FLAGS, COUNT, plane, b, kh, KH, S, cols, kvalid, 1, p_act - p_pred,
                 coef_dp * p_mag + allow, False)
        dk_pred = _column(e_d, 0, 3) / sigma
        dk_mag = _column(e_a, 3, 3) / sigma
        _verdict(STATS, FLAGS, COUNT, plane, b, kh, KH, S, cols, kvalid, 2, (tl.sum(dk, 1) - dk_pred) * scale,
                 (coef_dk * dk_mag + allow + under * _column(e_a, 12, 1)) * scale, False)
        dv_pred = _column(e_p, 6, 3) / sigma
        dv_mag = _column(e_p, 9, 3) / sigma
        _verdict(STATS, FLAGS, COUNT, plane, b, kh, KH, S, cols, kvalid, 3, tl.sum(dv, 1) - dv_pred,
                 coef_dv * dv_mag + allow + under * _column(e_p, 12, 1), False)
        # bwd_ds_col: Σ_i p_ij·(|dp_ij| + |D_i|) <= (‖v_j‖₁ + max_k ‖v_k‖₁)·Σ_i p_ij·‖dO_i‖∞, read with
        # p̃ from column 13 (mag_up, `under` for the column's underflow), plus P̃'s own underflow
        # (p_under per element) times the group's Σ_i ‖dO_i‖∞ (TOTDO)
        vspan = tl.sum(tl.abs(vf), 1) + tl.load(VMAX + bk) * mag_up
        ds_mag = vspan * (_column(e_p, 13, 1) * mag_up + under * _column(e_p, 12, 1) + p_under * tl.load(TOTDO + bk))
        _verdict(STATS, FLAGS, COUNT, plane, b, kh, KH, S, cols, kvalid, 4, r_tot, coef_ds * ds_mag + allow, False)
        _verdict(STATS, FLAGS, COUNT, plane, b, kh, KH, S, cols, kvalid, 5, x_dev, coef_pc * p_tot + allow, False)
    dk = dk * scale
    tl.store(DK + b.to(tl.int64) * skgb + kh.to(tl.int64) * skgk + cols[:, None].to(tl.int64) * skgs
             + hs[None, :] * skgh, dk.to(DK.dtype.element_ty), mask=kvalid[:, None])
    tl.store(DV + b.to(tl.int64) * svgb + kh.to(tl.int64) * svgk + cols[:, None].to(tl.int64) * svgs
             + hs[None, :] * svgh, dv.to(DV.dtype.element_ty), mask=kvalid[:, None])


@triton.jit
def _bwd_dq(Q, K, V, DO, O, LSE, DD, DQ, DS, MASK, BIAS, QLEN, KLEN, KB, WK, STATS, FLAGS, COUNT, FT, FV,
            sqb, sqn, sqt, sqh, skb, skk, sks, skh, svb, svk, svs, svh, sdb, sdn, sdt, sdh, sob, son, sot, soh,
            sqgb, sqgn, sqgt, sqgh, smb, smn, smt, sms, sbb, sbn, sbt, sbs,
            N, G, KH, T, S, scale, win_left, win_right, bn_offset, n_faults: tl.constexpr, plane, kplane_blk, n_nblocks,
            coef_qk, coef_dp, coef_dq, coef_d, soft0, soft_mu, coef_ds, allow, sigma, mag_up, under, p_under,
            H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_KLEN: tl.constexpr,
            STORE_DS: tl.constexpr, CHECKS: tl.constexpr, INJECT: tl.constexpr, UPCAST: tl.constexpr,
            PARTIAL: tl.constexpr = False):
    mb = tl.program_id(0)
    bn = tl.program_id(1) + bn_offset
    b = bn // N
    n = bn % N
    kh = n // G
    c = scale * LOG2E_B
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    hs = tl.arange(0, H)
    rvalid = rows < T
    q = tl.load(Q + b.to(tl.int64) * sqb + n.to(tl.int64) * sqn + rows[:, None].to(tl.int64) * sqt
                + hs[None, :] * sqh, mask=rvalid[:, None], other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdb + n.to(tl.int64) * sdn + rows[:, None].to(tl.int64) * sdt
                 + hs[None, :] * sdh, mask=rvalid[:, None], other=0.0)
    dt = q.dtype
    r_off = (b.to(tl.int64) * N + n) * T
    lse = tl.load(LSE + r_off + rows, mask=rvalid, other=float("inf"))
    di = tl.load(DD + r_off + rows, mask=rvalid, other=0.0)
    k_off = b.to(tl.int64) * skb + kh.to(tl.int64) * skk
    v_off = b.to(tl.int64) * svb + kh.to(tl.int64) * svk
    m_off = b.to(tl.int64) * smb + n.to(tl.int64) * smn
    b_off = b.to(tl.int64) * sbb + n.to(tl.int64) * sbn
    ks_off = (b.to(tl.int64) * KH + kh) * S  # WK's rows of this kv head
    kb_off = (b.to(tl.int64) * KH + kh) * n_nblocks
    qend, kend = _ends(QLEN, KLEN, b, T, S, HAS_QLEN, HAS_KLEN)
    live = rows < qend
    r2 = rows[:, None]
    # the band of keys the block's live rows attend, as in the forward
    r_lo = mb * BLOCK_M
    lo, hi = _band(r_lo, tl.minimum(r_lo + BLOCK_M, qend) - 1, kend, win_left, win_right)
    dq = tl.zeros([BLOCK_M, H], tl.float32)
    s_act = tl.zeros([BLOCK_M], tl.float32)
    p_act = tl.zeros([BLOCK_M], tl.float32)
    psum = tl.zeros([BLOCK_M], tl.float32)
    r_sum = tl.zeros([BLOCK_M], tl.float32)
    # products with the keys' weights (as in _bwd_dkdv): e_d = dS̃·W, e_a = |dS̃|·W, e_p = P̃·W
    e_d = tl.zeros([BLOCK_M, 16], tl.float32)
    e_a = tl.zeros([BLOCK_M, 16], tl.float32)
    e_p = tl.zeros([BLOCK_M, 16], tl.float32)
    k_sum = tl.zeros([H], tl.float32)
    k_abs = tl.zeros([H], tl.float32)
    v_sum = tl.zeros([H], tl.float32)
    v_abs = tl.zeros([H], tl.float32)
    for t in range(lo // BLOCK_N, (hi + BLOCK_N - 1) // BLOCK_N):
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        kvalid = cols < S
        c2 = cols[None, :]
        k_t = tl.load(K + k_off + c2.to(tl.int64) * sks + hs[:, None] * skh, mask=kvalid[None, :],
                      other=0.0)  # H × BLOCK_N
        v_t = tl.load(V + v_off + c2.to(tl.int64) * svs + hs[:, None] * svh, mask=kvalid[None, :],
                      other=0.0)
        qk = _mm(q, k_t, UPCAST)
        if INJECT:
            qk = _inject(qk, rows, cols, FT, FV, n_faults, b, n, SITE_BWD_SCORES, 0, scale)
        p = _probs(qk, r2, c2, live[:, None], kend, win_left, win_right, lse[:, None], c, MASK, m_off, smt, sms,
                   BIAS, b_off, sbt, sbs, T, S, HAS_MASK, HAS_BIAS)
        if INJECT:
            p = _inject(p, rows, cols, FT, FV, n_faults, b, n, SITE_BWD_PROBS, 0, 1.0)
        dp = _mm(do, v_t, UPCAST)
        if INJECT:
            dp = _inject(dp, rows, cols, FT, FV, n_faults, b, n, SITE_BWD_DP, 0, 1.0)
        ds = p * (dp - di[:, None])
        if INJECT:
            ds = _inject(ds, rows, cols, FT, FV, n_faults, b, n, SITE_BWD_DS, 0, 1.0)
        dsm = ds.to(dt)
        dq += _mm(dsm, tl.trans(k_t), UPCAST)
        if STORE_DS:
            tl.store(DS + ((b.to(tl.int64) * N + n) * T + r2) * S + c2, ds, mask=rvalid[:, None] & kvalid[None, :])
        if CHECKS:
            w = tl.load(WK + (ks_off + cols)[:, None] * 16 + tl.arange(0, 16)[None, :], mask=kvalid[:, None],
                        other=0.0)
            e_d = _mm_acc(dsm, w, e_d, UPCAST)
            e_a = _mm_acc(tl.abs(dsm), w, e_a, UPCAST)
            e_p = _mm_acc(p.to(dt), w, e_p, UPCAST)
            blk = (kb_off + t) * H + hs
            k_sum += tl.load(KB + blk)
            k_abs += tl.load(KB + kplane_blk + blk)
            v_sum += tl.load(KB + 2 * kplane_blk + blk)
            v_abs += tl.load(KB + 3 * kplane_blk + blk)
            s_act += tl.sum(qk, 1)
            p_act += tl.sum(dp, 1)
            psum += tl.sum(p, 1)
            r_sum += tl.sum(ds - (p * dp - p * di[:, None]), 1)
    if INJECT:
        dq = _inject(dq, rows, hs, FT, FV, n_faults, b, n, SITE_BWD_DQ, 0, scale)
    if CHECKS:
        qf = q.to(tl.float32)
        dof = do.to(tl.float32)
        _verdict(STATS, FLAGS, COUNT, plane, b, n, N, T, rows, rvalid, 0,
                 (s_act - tl.sum(qf * k_sum[None, :], 1)) * scale,
                 (coef_qk * tl.sum(tl.abs(qf) * k_abs[None, :], 1) + allow) * scale, False)
        _verdict(STATS, FLAGS, COUNT, plane, b, n, N, T, rows, rvalid, 1, p_act - tl.sum(dof * v_sum[None, :], 1),
                 coef_dp * tl.sum(tl.abs(dof) * v_abs[None, :], 1) + allow, False)
        # P's rows sum to 1, or to 0 where the forward attended nothing (LSE = +inf); PARTIAL (one
        # step of a ring, whose keys are a part of the row's): the signed sum itself, for the caller
        attended = lse < float("inf")
        if PARTIAL:
            target = tl.zeros([BLOCK_M], tl.float32)
        else:
            target = tl.where(attended, 1.0, 0.0)
        soft = tl.where(attended, soft0 + soft_mu * tl.abs(lse), 0.0)
        _verdict(STATS, FLAGS, COUNT, plane, b, n, N, T, rows, rvalid, 2, psum - target, soft + allow, PARTIAL)
        dq_pred = _column(e_d, 0, 3) / sigma
        dq_mag = _column(e_a, 3, 3) / sigma
        _verdict(STATS, FLAGS, COUNT, plane, b, n, N, T, rows, rvalid, 3, (tl.sum(dq, 1) - dq_pred) * scale,
                 (coef_dq * dq_mag + allow + under * _column(e_a, 12, 1)) * scale, False)
        o = tl.load(O + b.to(tl.int64) * sob + n.to(tl.int64) * son + rows[:, None].to(tl.int64) * sot
                    + hs[None, :] * soh, mask=rvalid[:, None], other=0.0).to(tl.float32)
        _verdict(STATS, FLAGS, COUNT, plane, b, n, N, T, rows, rvalid, 4, tl.sum(dof * o, 1) - di,
                 coef_d * tl.sum(tl.abs(dof * o), 1) + allow, False)
        # bwd_ds: dS as used against its second evaluation p·dp − p·D, per row; magnitude
        # Σ_j p_ij·(|dp_ij| + |D_i|) <= ‖dO_i‖∞·Σ_j p_ij·‖v_j‖₁ + |D_i|·Σ_j p_ij (pw: read with p̃)
        dmax = tl.max(tl.abs(dof), 1)
        pw = _column(e_p, 6, 3) / sigma * mag_up + under * _column(e_p, 12, 1) + p_under * tl.sum(v_abs, 0)
        _verdict(STATS, FLAGS, COUNT, plane, b, n, N, T, rows, rvalid, 5, r_sum,
                 coef_ds * (dmax * pw + tl.abs(di) * psum) + allow, False)

    dq = dq * scale
    tl.store(DQ + b.to(tl.int64) * sqgb + n.to(tl.int64) * sqgn + rows[:, None].to(tl.int64) * sqgt
             + hs[None, :] * sqgh, dq.to(DQ.dtype.element_ty), mask=rvalid[:, None])
