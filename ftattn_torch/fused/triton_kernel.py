"""Triton kernels of ``implementation="triton"``: a fused, self-checking flash attention forward.

Import this module only through :mod:`ftattn_torch.fused`, which decides
whether Triton compiles the kernels or interprets them (``TRITON_INTERPRET=1``
must be set before this module is imported). Nothing here imports the
reference or the unfused path.

Two kernels, legend of ``ftattn_spec.axes`` (q ``B N T H``, k and v ``B K S H``,
query head ``n`` reads kv head ``n // G``):

``_prepass`` (grid: ``B·K`` × key chunks), in float32:
  * ``KSUM[b, kh, c + 1] = (Σ k_j, Σ |k_j|)`` over the keys of chunk ``c``
    (``CHUNK`` keys); the caller turns it into exclusive prefix sums with one
    ``cumsum``, so ``KSUM[b, kh, c]`` sums the keys before ``c·CHUNK``.
  * ``VCOL[b, kh, j] = (v̄_j, w_j)`` each split into three parts of the input
    dtype (hi + mid + lo), ``v̄_j = Σ_h v_jh``, ``w_j = Σ_h |v_jh|``, padded to
    16 columns: the extra MMA columns of the ``pv_row`` check.

``_forward`` (grid: query blocks × ``B·N`` (launched in slices of at most
65535 heads, the limit of a grid's second axis), or a list of blocks to recompute):
the online-softmax forward. With ``QK``, ``DMR``, ``PV`` it also keeps, per query row,
  * ``srow``: Σ_j s_ij (raw q·k, masked keys left out), for ``qk_row``;
  * ``l2``, ``d``: a second evaluation of every exponential (a different
    formula: ``exp2((s − m)·c)`` against ``exp2(s·c − m·c)``), its running sum
    and Σ over tiles of |Σ_tile p − Σ_tile p'|, for ``softmax_dmr``; the
    rescale factor is evaluated twice too;
  * ``pv``: P̂·VCOL on the tensor cores, rescaled like the accumulator, for
    ``pv_row``;
and writes per-row (residual, threshold) pairs into ``STATS`` (signed
differences with ``SIGNED``, for ``granularity="global"``), flags into
``FLAGS``, and counts into ``COUNT``: ``COUNT[0]`` flagged rows,
``COUNT[1]`` non-finite input elements (both kernels count them).
Thresholds are ``ftattn_spec.tolerances.fused_*`` coefficients times per-row
magnitudes computed here.

Faults (``INJECT``): ``FT`` int32 ``(F, 8)`` rows (site, replica, b, n, i, j,
kind, bit) and ``FV`` float32 ``(F,)`` values, read at run time.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)

# ftattn_spec.faults.SITES indices of the sites the kernel injects itself
SITE_SCORES = tl.constexpr(0)
SITE_PROBS = tl.constexpr(1)
SITE_OUT = tl.constexpr(2)


@triton.jit
def _exp2_fma(x):
    """2^x for x <= 0 on the FMA pipe instead of the MUFU unit: the softmax replica.

    x = r + f with r = round(x) (by adding and subtracting 1.5·2²³), 2^f on
    [-½, ½] by a degree-5 polynomial (relative error 2.8e-7, 6.2u after float32
    Horner), and 2^r added into the exponent bits. x < -125 gives 0 (the
    primary gives at most 2^-125 there).
    """
    xc = tl.maximum(x, -127.0)
    big = xc + 12582912.0
    f = xc - (big - 12582912.0)
    p = 0.0013240507105365396
    p = p * f + 0.009663134813308716
    p = p * f + 0.05550714582204819
    p = p * f + 0.240223690867424
    p = p * f + 0.6931470632553101
    p = p * f + 1.0
    n = big.to(tl.int32, bitcast=True) - 0x4B400000
    y = (p.to(tl.int32, bitcast=True) + (n << 23)).to(tl.float32, bitcast=True)
    return tl.where(x < -125.0, 0.0, y)


@triton.jit
def _round_bf16(x):
    """float32 ``x`` rounded to the nearest bfloat16 (ties to even), kept in float32.

    The interpreter's float32 → bfloat16 conversion truncates; the GPU's
    rounds to nearest. With ``UPCAST`` (the interpreter) the kernel rounds
    here, so both round alike.
    """
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _corrupt(x, kind, bit, value, unit):
    """``x`` (float32) with ``bit`` flipped (kind 0), set to ``value`` (1) or plus
    ``value`` (2), in the logical units ``x·unit``."""
    logical = x * unit
    flipped = (logical.to(tl.int32, bitcast=True) ^ (1 << bit)).to(tl.float32, bitcast=True)
    return tl.where(kind == 0, flipped, tl.where(kind == 1, value, logical + value)) / unit


@triton.jit
def _inject(x, rows, cols, FT, FV, n_faults, b, n, site: tl.constexpr, replica, unit):
    """Apply the faults of ``site``/``replica`` at (b, n, row, col) that fall in this tile."""
    r_lo = tl.min(rows, 0)
    r_hi = tl.max(rows, 0)
    c_lo = tl.min(cols, 0)
    c_hi = tl.max(cols, 0)
    for f in range(n_faults):
        row = FT + f * 8
        fs = tl.load(row)
        fr = tl.load(row + 1)
        fb = tl.load(row + 2)
        fn = tl.load(row + 3)
        fi = tl.load(row + 4)
        fj = tl.load(row + 5)
        here = (fs == site) & (fr == replica) & (fb == b) & (fn == n)
        here = here & (fi >= r_lo) & (fi <= r_hi) & (fj >= c_lo) & (fj <= c_hi)
        if here:
            kind = tl.load(row + 6)
            bit = tl.load(row + 7)
            value = tl.load(FV + f)
            hit = (rows[:, None] == fi) & (cols[None, :] == fj)
            x = tl.where(hit, _corrupt(x, kind, bit, value, unit), x)
    return x


@triton.jit
def _nonfinite(x, valid):
    """Number of NaN or infinite elements of ``x`` where ``valid``."""
    bad = (x != x) | (tl.abs(x) == float("inf"))
    return tl.sum(tl.sum((bad & valid).to(tl.int32), 1), 0)


@triton.jit
def _verdict(STATS, FLAGS, COUNT, plane, b, n, N, T, rows, rvalid, which: tl.constexpr, diff, thr,
             SIGNED: tl.constexpr):
    """One check's rows: (residual or signed difference, threshold) into planes
    ``2·which`` and ``2·which + 1`` of STATS, the flag into plane ``which`` of
    FLAGS, and the number of flagged rows added to ``COUNT[0]``."""
    at = (b.to(tl.int64) * N + n) * T + rows
    res = tl.abs(diff)
    flag = ~((res <= thr) & (tl.abs(thr) < float("inf")))
    if SIGNED:
        tl.store(STATS + at + (2 * which) * plane, diff, mask=rvalid)
    else:
        tl.store(STATS + at + (2 * which) * plane, res, mask=rvalid)
    tl.store(STATS + at + (2 * which + 1) * plane, thr, mask=rvalid)
    tl.store(FLAGS + at + which * plane, flag.to(tl.int8), mask=rvalid)
    nflag = tl.sum((flag & rvalid).to(tl.int32), 0)
    if nflag > 0:
        tl.atomic_add(COUNT, nflag)


@triton.jit
def _prepass(K, V, KSUM, VCOL, COUNT, skb, skk, sks, skh, svb, svk, svs, svh, KH, S, n_chunks, vcol_scale,
             H: tl.constexpr, CHUNK: tl.constexpr, SUMS: tl.constexpr):
    bk = tl.program_id(0)
    c = tl.program_id(1)
    b = bk // KH
    kh = bk % KH
    rows = c * CHUNK + tl.arange(0, CHUNK)
    hs = tl.arange(0, H)
    valid = rows < S
    k = tl.load(K + b.to(tl.int64) * skb + kh * skk + rows[:, None].to(tl.int64) * sks + hs[None, :] * skh,
                mask=valid[:, None], other=0.0).to(tl.float32)
    v = tl.load(V + b.to(tl.int64) * svb + kh * svk + rows[:, None].to(tl.int64) * svs + hs[None, :] * svh,
                mask=valid[:, None], other=0.0)
    bad = _nonfinite(k, valid[:, None]) + _nonfinite(v.to(tl.float32), valid[:, None])
    if bad > 0:
        tl.atomic_add(COUNT + 1, bad)
    if SUMS:
        _chunk_sums(k, v, KSUM, VCOL, c, bk, rows, valid, S, n_chunks, vcol_scale, H, CHUNK)


@triton.jit
def _chunk_sums(k, v, KSUM, VCOL, c, bk, rows, valid, S, n_chunks, vcol_scale, H: tl.constexpr, CHUNK: tl.constexpr):
    hs = tl.arange(0, H)
    base = KSUM + (bk.to(tl.int64) * (n_chunks + 1)) * 2 * H
    tl.store(base + (c + 1) * 2 * H + hs, tl.sum(k, 0))
    tl.store(base + (c + 1) * 2 * H + H + hs, tl.sum(tl.abs(k), 0))
    if c == 0:
        tl.store(base + hs, tl.zeros([H], tl.float32))
        tl.store(base + H + hs, tl.zeros([H], tl.float32))
    dt = v.dtype
    v = v.to(tl.float32)
    vs = tl.sum(v, 1) * vcol_scale  # a power of two (tol.fused_vcol_scale): exact, and no overflow
    va = tl.sum(tl.abs(v), 1) * vcol_scale
    s_hi = vs.to(dt)
    s_r = vs - s_hi.to(tl.float32)
    s_mid = s_r.to(dt)
    s_lo = (s_r - s_mid.to(tl.float32)).to(dt)
    a_hi = va.to(dt)
    a_r = va - a_hi.to(tl.float32)
    a_mid = a_r.to(dt)
    a_lo = (a_r - a_mid.to(tl.float32)).to(dt)
    col = tl.arange(0, 16)[None, :]
    zero = tl.zeros([CHUNK, 16], tl.float32).to(dt)
    t = tl.where(col == 0, s_hi[:, None], zero)
    t = tl.where(col == 1, s_mid[:, None], t)
    t = tl.where(col == 2, s_lo[:, None], t)
    t = tl.where(col == 3, a_hi[:, None], t)
    t = tl.where(col == 4, a_mid[:, None], t)
    t = tl.where(col == 5, a_lo[:, None], t)
    out = VCOL + (bk.to(tl.int64) * S + rows[:, None]) * 16 + col
    tl.store(out, t, mask=valid[:, None])


@triton.jit
def _tile(acc, m_raw, l, srow, l2, d, pv, nc, mmax, q, K, V, VCOL, kv_off, v_off, vcol_off, sks, skh, svs, svh,
          start_n, rows, S, c, scale, FT, FV, n_faults, b, n,
          H: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
          QK: tl.constexpr, DMR: tl.constexpr, PV: tl.constexpr, INJECT: tl.constexpr, UPCAST: tl.constexpr,
          REPLICA_FMA: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    hs = tl.arange(0, H)
    kvalid = cols < S
    k = tl.load(K + kv_off + cols[None, :].to(tl.int64) * sks + hs[:, None] * skh,
                mask=kvalid[None, :], other=0.0)  # H × BLOCK_N
    v = tl.load(V + v_off + cols[:, None].to(tl.int64) * svs + hs[None, :] * svh,
                mask=kvalid[:, None], other=0.0)  # BLOCK_N × H
    dt = v.dtype
    if UPCAST:
        qk = tl.dot(q.to(tl.float32), k.to(tl.float32))
    else:
        qk = tl.dot(q, k)
    if INJECT:
        qk = _inject(qk, rows, cols, FT, FV, n_faults, b, n, SITE_SCORES, 0, scale)
    if MASKED:
        keep = kvalid[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])
        qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m_raw, tl.max(qk, 1))
    m_sc = m_new * c
    # (s − m)·c is exactly 0 at the row maximum and never positive, so the sum
    # is at least 1 and nothing overflows at any finite logit. The fused
    # multiply-add s·c − m·c (one operation instead of two) is off by up to half
    # an ulp of |m·c| there: from |m·c| = 2³⁰ on it overflows exp2 or flushes a
    # row to 0. Measured cost and a rejected per-tile switch: docs/kernels.md, M8.
    p = tl.math.exp2((qk - m_new[:, None]) * c)
    alpha = tl.math.exp2((m_raw - m_new) * c)
    if INJECT:
        p = _inject(p, rows, cols, FT, FV, n_faults, b, n, SITE_PROBS, 0, 1.0)
    lt = tl.sum(p, 1)
    l = l * alpha + lt
    acc = acc * alpha[:, None]
    if UPCAST:
        pm = _round_bf16(p)
        acc = tl.dot(pm, v.to(tl.float32), acc)
    else:
        pm = p.to(dt)
        acc = tl.dot(pm, v, acc)
    if QK:
        if MASKED:
            srow += tl.sum(tl.where(keep, qk, 0.0), 1)
        else:
            srow += tl.sum(qk, 1)
    if DMR:
        # the replica: its own argument formula (clamped at 0, see above) and
        # its own rescale factor
        if REPLICA_FMA:
            p2 = _exp2_fma(tl.minimum(qk * c - m_sc[:, None], 0.0))
        else:
            p2 = tl.math.exp2(tl.minimum(qk * c - m_sc[:, None], 0.0))
        if INJECT:
            p2 = _inject(p2, rows, cols, FT, FV, n_faults, b, n, SITE_PROBS, 1, 1.0)
        alpha2 = tl.math.exp2(tl.minimum(m_raw * c - m_sc, 0.0))
        l2t = tl.sum(p2, 1)
        l2 = l2 * alpha2 + l2t
        d = d * alpha + tl.abs(lt - l2t)
    if DMR or PV:
        nc += ((m_new > m_raw) & (m_raw > float("-inf"))).to(tl.int32)
        mmax = tl.maximum(mmax, tl.abs(m_sc))
    if PV:
        vc = tl.load(VCOL + vcol_off + cols[:, None].to(tl.int64) * 16 + tl.arange(0, 16)[None, :],
                     mask=kvalid[:, None], other=0.0)
        if UPCAST:
            pv = tl.dot(pm, vc.to(tl.float32), pv * alpha[:, None])
        else:
            pv = tl.dot(pm, vc, pv * alpha[:, None])
    return acc, m_new, l, srow, l2, d, pv, nc, mmax


@triton.jit
def _forward(Q, K, V, O, KSUM, VCOL, STATS, FLAGS, COUNT, FT, FV, REDO,
             sqb, sqn, sqt, sqh, skb, skk, sks, skh, svb, svk, svs, svh, sob, son, sot, soh,
             N, G, KH, T, S, n_chunks, n_faults, plane, bn_offset, scale,
             coef_qk, allow_qk, coef_pv, coef_pv_nc, allow_pv, dmr_a0, dmr_a1, dmr_a2, allow_dmr, vcol_unscale,
             H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
             CAUSAL: tl.constexpr, QK: tl.constexpr, DMR: tl.constexpr, PV: tl.constexpr,
             INJECT: tl.constexpr, REDO_MODE: tl.constexpr,
             UPCAST: tl.constexpr, SIGNED: tl.constexpr, REPLICA_FMA: tl.constexpr):
    if REDO_MODE:
        mb = tl.load(REDO + 2 * tl.program_id(0))
        bn = tl.load(REDO + 2 * tl.program_id(0) + 1)
    else:
        mb = tl.program_id(0)
        bn = tl.program_id(1) + bn_offset
    b = bn // N
    n = bn % N
    kh = n // G
    c = scale * LOG2E
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    hs = tl.arange(0, H)
    rvalid = rows < T
    q = tl.load(Q + b.to(tl.int64) * sqb + n.to(tl.int64) * sqn + rows[:, None].to(tl.int64) * sqt
                + hs[None, :] * sqh, mask=rvalid[:, None], other=0.0)
    if not REDO_MODE:
        bad = _nonfinite(q.to(tl.float32), rvalid[:, None])
        if bad > 0:
            tl.atomic_add(COUNT + 1, bad)
    kv_off = b.to(tl.int64) * skb + kh.to(tl.int64) * skk
    v_off = b.to(tl.int64) * svb + kh.to(tl.int64) * svk
    vcol_off = (b.to(tl.int64) * KH + kh) * S * 16

    acc = tl.zeros([BLOCK_M, H], tl.float32)
    m_raw = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    srow = tl.zeros([BLOCK_M], tl.float32)
    l2 = tl.zeros([BLOCK_M], tl.float32)
    d = tl.zeros([BLOCK_M], tl.float32)
    pv = tl.zeros([BLOCK_M, 16], tl.float32)
    nc = tl.zeros([BLOCK_M], tl.int32)
    mmax = tl.zeros([BLOCK_M], tl.float32)

    if CAUSAL:
        hi = tl.minimum(S, (mb + 1) * BLOCK_M)
        edge = tl.minimum(S, mb * BLOCK_M)
    else:
        hi = S
        edge = S
    full_end = (edge // BLOCK_N) * BLOCK_N  # tiles before this need no mask
    for start_n in range(0, full_end, BLOCK_N):
        acc, m_raw, l, srow, l2, d, pv, nc, mmax = _tile(
            acc, m_raw, l, srow, l2, d, pv, nc, mmax, q, K, V, VCOL, kv_off, v_off, vcol_off, sks, skh, svs, svh,
            start_n, rows, S, c, scale, FT, FV, n_faults, b, n,
            H, BLOCK_N, False, CAUSAL, QK, DMR, PV, INJECT, UPCAST, REPLICA_FMA)
    for start_n in range(full_end, hi, BLOCK_N):
        acc, m_raw, l, srow, l2, d, pv, nc, mmax = _tile(
            acc, m_raw, l, srow, l2, d, pv, nc, mmax, q, K, V, VCOL, kv_off, v_off, vcol_off, sks, skh, svs, svh,
            start_n, rows, S, c, scale, FT, FV, n_faults, b, n,
            H, BLOCK_N, True, CAUSAL, QK, DMR, PV, INJECT, UPCAST, REPLICA_FMA)

    inv = 1.0 / l
    o = acc * inv[:, None]
    if INJECT:
        o = _inject(o, rows, hs, FT, FV, n_faults, b, n, SITE_OUT, 0, 1.0)
    o_st = _round_bf16(o) if UPCAST else o
    tl.store(O + b.to(tl.int64) * sob + n.to(tl.int64) * son + rows[:, None].to(tl.int64) * sot
             + hs[None, :] * soh, o_st.to(O.dtype.element_ty), mask=rvalid[:, None])

    if QK:
        # ---- qk_row: Σ_j s_ij against q_i·(Σ over attended keys of k)
        if CAUSAL:
            chunk = tl.minimum((mb * BLOCK_M) // CHUNK, n_chunks)
        else:
            chunk = n_chunks
        kbase = KSUM + ((b.to(tl.int64) * KH + kh) * (n_chunks + 1) + chunk) * 2 * H
        ksum = tl.load(kbase + hs)
        kabs = tl.load(kbase + H + hs)
        qf = q.to(tl.float32)
        pred = tl.sum(qf * ksum[None, :], 1)
        mag = tl.sum(tl.abs(qf) * kabs[None, :], 1)
        if CAUSAL:
            # keys of the diagonal block up to each row: a 0/1 triangle times K
            dcols = mb * BLOCK_M + tl.arange(0, BLOCK_M)
            kd = tl.load(K + kv_off + dcols[:, None].to(tl.int64) * sks + hs[None, :] * skh,
                         mask=(dcols < S)[:, None], other=0.0)
            if UPCAST:
                tri = (dcols[None, :] <= rows[:, None]).to(tl.float32)
                ksd = tl.dot(tri, kd.to(tl.float32))
                kad = tl.dot(tri, tl.abs(kd.to(tl.float32)))
            else:
                tri = (dcols[None, :] <= rows[:, None]).to(kd.dtype)
                ksd = tl.dot(tri, kd)
                kad = tl.dot(tri, tl.abs(kd))
            pred += tl.sum(qf * ksd, 1)
            mag += tl.sum(tl.abs(qf) * kad, 1)
        _verdict(STATS, FLAGS, COUNT, plane, b, n, N, T, rows, rvalid, 0, (srow - pred) * scale,
                 (coef_qk * mag + allow_qk) * scale, SIGNED)
    nc_f = nc.to(tl.float32)
    if DMR:
        # ---- softmax_dmr: replica sums, plus range checks (finite max and sums, l >= 1)
        thr = dmr_a0 + dmr_a1 * nc_f + dmr_a2 * mmax * (1.0 + nc_f) + allow_dmr * inv
        r = (d + tl.abs(l - l2)) * inv
        ok = (m_raw > float("-inf")) & (m_raw < float("inf")) & (l < float("inf")) & (l2 < float("inf"))
        ok = ok & (l * (1.0 + thr) >= 1.0)
        r = tl.where(ok, r, float("inf"))
        _verdict(STATS, FLAGS, COUNT, plane, b, n, N, T, rows, rvalid, 1, r, thr, False)
    if PV:
        # ---- pv_row: Σ_h o_ih against (P̂·v̄)_i / l_i
        ccol = tl.arange(0, 16)[None, :]
        pvp = tl.sum(tl.where(ccol < 3, pv, 0.0), 1) * (inv * vcol_unscale)
        pvw = tl.sum(tl.where((ccol >= 3) & (ccol < 6), pv, 0.0), 1) * (inv * vcol_unscale)
        _verdict(STATS, FLAGS, COUNT, plane, b, n, N, T, rows, rvalid, 2, tl.sum(o, 1) - pvp,
                 (coef_pv + coef_pv_nc * nc_f) * pvw + allow_pv, SIGNED)
