"""Triton kernels of the fused backward (``implementation="triton"``): flash-attention style.

Import only through :mod:`ftattn_torch.fused` (it decides whether Triton compiles or
interprets). Legend of ``ftattn_spec.axes``: q ``B N T H``, k and v ``B K S H``, query head
``n`` reads kv head ``n // G``.

The forward saves ``LSE``, float32 ``(B, N, T)``: per row ``m·c_z + log2 l`` in base-2 units
of the logits (``+inf`` for a row that attends nothing), so that ``p_ij = exp2(z_ij·c_z −
LSE_i)`` is recomputed tile by tile from Q and K, never stored. ``DD`` is
``D_i = Σ_h dO_ih·O_ih`` (float32, ``(B, N, T)``). Two kernels, no atomics:

``_bwd_dkdv`` (grid: key blocks × ``B·K``): for its keys, over the ``G`` query heads of the
  group and the query blocks that attend them, ``dV += Pᵀ·dO`` and ``dK += dSᵀ·Q·scale`` with
  ``dS = P ∘ (dO·Vᵀ − D)``: dK and dV are summed over the group inside one program.
``_bwd_dq`` (grid: query blocks × ``B·N``): ``dQ += dS·K·scale`` over the keys its rows
  attend; with ``STORE_DS`` it also writes ``dS`` (the bias gradient, float32 ``(B, N, T, S)``,
  only when a bias needs one).

Every mask form of the forward (``_keep``) applies per element; the loops visit only the
band of tiles that the window, ``is_causal`` and the lengths leave, and contain no
data-dependent branch (docs/kernels.md, "Masks": such branches miscompiled on the H200).
Memory beyond inputs, outputs and gradients: ``LSE`` and ``DD``, O(B·N·T).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernel import _keep

LOG2E_B = tl.constexpr(1.4426950408889634)


@triton.jit
def _probs(q, k, rows, cols, live, kend, win_left, win_right, lse, c, MASK, m_off, smt, sms, BIAS, b_off, sbt, sbs,
           T, S, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr):
    """P of one (query block × key block) tile, recomputed in float32 from the saved ``lse``;
    zero wherever a mask form leaves the entry out. ``k`` is ``H × BLOCK_N``."""
    if UPCAST:
        qk = tl.dot(q.to(tl.float32), k.to(tl.float32))
    else:
        qk = tl.dot(q, k)
    zc = qk * c
    if HAS_BIAS:
        bt = tl.load(BIAS + b_off + rows[:, None].to(tl.int64) * sbt + cols[None, :].to(tl.int64) * sbs,
                     mask=(rows < T)[:, None] & (cols < S)[None, :], other=0.0).to(tl.float32)
        zc = zc + bt * LOG2E_B
    keep = _keep(rows, cols, live, kend, win_left, win_right, MASK, m_off, smt, sms, T, S, HAS_MASK)
    return tl.where(keep, tl.math.exp2(zc - lse[:, None]), 0.0)


@triton.jit
def _mm(a, b, UPCAST: tl.constexpr):
    """``a·b`` with float32 accumulation (operands upcast in the interpreter, whose bfloat16
    ``tl.dot`` is wrong)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _bwd_dkdv(Q, K, V, DO, LSE, DD, DK, DV, MASK, BIAS, QLEN, KLEN,
              sqb, sqn, sqt, sqh, skb, skk, sks, skh, svb, svk, svs, svh, sdb, sdn, sdt, sdh,
              skgb, skgk, skgs, skgh, svgb, svgk, svgs, svgh, smb, smn, smt, sms, sbb, sbn, sbt, sbs,
              N, G, KH, T, S, scale, win_left, win_right, bk_offset,
              H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_KLEN: tl.constexpr,
              UPCAST: tl.constexpr):
    nb = tl.program_id(0)
    bk = tl.program_id(1) + bk_offset
    b = bk // KH
    kh = bk % KH
    c = scale * LOG2E_B
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    hs = tl.arange(0, H)
    kvalid = cols < S
    k_t = tl.load(K + b.to(tl.int64) * skb + kh.to(tl.int64) * skk + cols[None, :].to(tl.int64) * sks
                  + hs[:, None] * skh, mask=kvalid[None, :], other=0.0)  # H × BLOCK_N
    v_t = tl.load(V + b.to(tl.int64) * svb + kh.to(tl.int64) * svk + cols[None, :].to(tl.int64) * svs
                  + hs[:, None] * svh, mask=kvalid[None, :], other=0.0)  # H × BLOCK_N
    dt = k_t.dtype
    qend = T
    if HAS_QLEN:
        qend = tl.minimum(T, tl.load(QLEN + b).to(tl.int32))
    kend = S
    if HAS_KLEN:
        kend = tl.maximum(tl.minimum(S, tl.load(KLEN + b).to(tl.int32)), 0)
    # the query rows that attend a key of this block: j - win_right <= i <= j + win_left
    c_lo = nb * BLOCK_N
    c_hi = tl.minimum(c_lo + BLOCK_N, kend) - 1
    lo = tl.maximum(c_lo - win_right, 0)
    hi = tl.minimum(qend, c_hi + win_left + 1)
    hi = tl.where(c_hi < c_lo, 0, tl.maximum(hi, 0))
    lo = tl.minimum(lo, hi)
    m_start = lo // BLOCK_M
    m_end = (hi + BLOCK_M - 1) // BLOCK_M
    dk = tl.zeros([BLOCK_N, H], tl.float32)
    dv = tl.zeros([BLOCK_N, H], tl.float32)
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
            q = tl.load(Q + q_off + rows[:, None].to(tl.int64) * sqt + hs[None, :] * sqh, mask=rvalid[:, None],
                        other=0.0)
            do = tl.load(DO + d_off + rows[:, None].to(tl.int64) * sdt + hs[None, :] * sdh, mask=rvalid[:, None],
                         other=0.0)
            lse = tl.load(LSE + r_off + rows, mask=rvalid, other=float("inf"))
            di = tl.load(DD + r_off + rows, mask=rvalid, other=0.0)
            p = _probs(q, k_t, rows, cols, live, kend, win_left, win_right, lse, c, MASK, m_off, smt, sms, BIAS,
                       b_off, sbt, sbs, T, S, HAS_MASK, HAS_BIAS, UPCAST)
            dv += _mm(tl.trans(p.to(dt)), do, UPCAST)
            ds = p * (_mm(do, v_t, UPCAST) - di[:, None])
            dk += _mm(tl.trans(ds.to(dt)), q, UPCAST)
    dk = dk * scale
    tl.store(DK + b.to(tl.int64) * skgb + kh.to(tl.int64) * skgk + cols[:, None].to(tl.int64) * skgs
             + hs[None, :] * skgh, dk.to(DK.dtype.element_ty), mask=kvalid[:, None])
    tl.store(DV + b.to(tl.int64) * svgb + kh.to(tl.int64) * svgk + cols[:, None].to(tl.int64) * svgs
             + hs[None, :] * svgh, dv.to(DV.dtype.element_ty), mask=kvalid[:, None])


@triton.jit
def _bwd_dq(Q, K, V, DO, LSE, DD, DQ, DS, MASK, BIAS, QLEN, KLEN,
            sqb, sqn, sqt, sqh, skb, skk, sks, skh, svb, svk, svs, svh, sdb, sdn, sdt, sdh,
            sqgb, sqgn, sqgt, sqgh, smb, smn, smt, sms, sbb, sbn, sbt, sbs,
            N, G, T, S, scale, win_left, win_right, bn_offset,
            H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_KLEN: tl.constexpr,
            STORE_DS: tl.constexpr, UPCAST: tl.constexpr):
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
    qend = T
    if HAS_QLEN:
        qend = tl.minimum(T, tl.load(QLEN + b).to(tl.int32))
    kend = S
    if HAS_KLEN:
        kend = tl.maximum(tl.minimum(S, tl.load(KLEN + b).to(tl.int32)), 0)
    live = rows < qend
    # the band of keys the block's live rows attend, as in the forward
    r_lo = mb * BLOCK_M
    r_hi = tl.minimum(r_lo + BLOCK_M, qend) - 1
    lo = tl.maximum(r_lo - win_left, 0)
    hi = tl.minimum(kend, r_hi + win_right + 1)
    hi = tl.where(r_hi < r_lo, 0, tl.maximum(hi, 0))
    lo = tl.minimum(lo, hi)
    dq = tl.zeros([BLOCK_M, H], tl.float32)
    for t in range(lo // BLOCK_N, (hi + BLOCK_N - 1) // BLOCK_N):
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        kvalid = cols < S
        k_t = tl.load(K + k_off + cols[None, :].to(tl.int64) * sks + hs[:, None] * skh, mask=kvalid[None, :],
                      other=0.0)  # H × BLOCK_N
        v_t = tl.load(V + v_off + cols[None, :].to(tl.int64) * svs + hs[:, None] * svh, mask=kvalid[None, :],
                      other=0.0)
        p = _probs(q, k_t, rows, cols, live, kend, win_left, win_right, lse, c, MASK, m_off, smt, sms, BIAS,
                   b_off, sbt, sbs, T, S, HAS_MASK, HAS_BIAS, UPCAST)
        ds = p * (_mm(do, v_t, UPCAST) - di[:, None])
        dq += _mm(ds.to(dt), tl.trans(k_t), UPCAST)
        if STORE_DS:
            tl.store(DS + ((b.to(tl.int64) * N + n) * T + rows[:, None]) * S + cols[None, :], ds,
                     mask=rvalid[:, None] & kvalid[None, :])
    dq = dq * scale
    tl.store(DQ + b.to(tl.int64) * sqgb + n.to(tl.int64) * sqgn + rows[:, None].to(tl.int64) * sqgt
             + hs[None, :] * sqgh, dq.to(DQ.dtype.element_ty), mask=rvalid[:, None])
