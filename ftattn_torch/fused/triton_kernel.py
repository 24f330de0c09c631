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
the online-softmax forward; with ``STORE_LSE`` it saves each row's log-sum-exp in
base 2 (``LSE``, float32 ``(B, N, T)``) for the backward (:mod:`.triton_backward`).
With ``QK``, ``DMR``, ``PV`` it also keeps, per query row,
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

from .triton_exp import exp_tile_ratio, rescale_ratio

LOG2E = tl.constexpr(1.4426950408889634)

# ftattn_spec.faults.SITES indices of the sites the kernel injects itself
SITE_SCORES = tl.constexpr(0)
SITE_PROBS = tl.constexpr(1)
SITE_OUT = tl.constexpr(2)
SITE_RESCALE = tl.constexpr(13)
SITE_ROWSUM = tl.constexpr(14)
#: VCOL's column of ones: ``P̂·1`` beside ``pv_row``'s columns, against l (softmax_exp)
ONES_COL = tl.constexpr(6)


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
    bits = logical.to(tl.int32, bitcast=True)
    changed = tl.where(kind == 3, bits | (1 << bit), tl.where(kind == 4, bits & ~(1 << bit), bits ^ (1 << bit)))
    return tl.where(kind == 1, value, tl.where(kind == 2, logical + value, changed.to(tl.float32, bitcast=True))) / unit


@triton.jit
def _inject(x, rows, cols, FT, FV, n_faults, b, n, site: tl.constexpr, replica, unit):
    """Apply the faults of ``site``/``replica`` at (b, n, row, col) that fall in this tile."""
    return _inject_at(x, rows[:, None], cols[None, :], tl.min(rows, 0), tl.max(rows, 0), tl.min(cols, 0),
                      tl.max(cols, 0), FT, FV, n_faults, b, n, site, replica, unit)


@triton.jit
def _inject_at(x, r2, c2, r_lo, r_hi, c_lo, c_hi, FT, FV, n_faults, b, n, site: tl.constexpr, replica, unit):
    """:func:`_inject` on a tile whose row and column indices broadcast from ``r2`` and ``c2``
    (either orientation), spanning rows ``r_lo..r_hi`` and columns ``c_lo..c_hi``."""
    for f in tl.static_range(n_faults):  # unrolled: the count is a compile-time constant
        row = FT + f * 8
        fs = tl.load(row)
        fr = tl.load(row + 1)
        fb = tl.load(row + 2)
        fn = tl.load(row + 3)
        fi = tl.load(row + 4)
        fj = tl.load(row + 5)
        # -1: every position along that axis (a stuck-at fault's wildcard). The count is a
        # compile-time constant: with a run-time loop over two or more faults the compiled kernel
        # flagged every row's pv_row on the H200, or read an illegal address (docs/kernels.md)
        here = (fs == site) & (fr == replica) & ((fb == -1) | (fb == b)) & ((fn == -1) | (fn == n))
        here = here & ((fi == -1) | ((fi >= r_lo) & (fi <= r_hi))) & ((fj == -1) | ((fj >= c_lo) & (fj <= c_hi)))
        kind = tl.load(row + 6)
        bit = tl.load(row + 7)
        value = tl.load(FV + f)
        hit = here & ((fi == -1) | (r2 == fi)) & ((fj == -1) | (c2 == fj))
        x = tl.where(hit, _corrupt(x, kind, bit, value, unit), x)
    return x


@triton.jit
def _inject_rows(x, rows, cols, FT, FV, n_faults, b, n, site: tl.constexpr, BLOCK_N: tl.constexpr):
    """A per-row value of the tile whose keys are ``cols`` (the rescale factor), with the faults of
    ``site`` at (b, n, row, any key of the tile) applied."""
    x2 = _inject(tl.broadcast_to(x[:, None], [x.shape[0], BLOCK_N]), rows, cols, FT, FV, n_faults, b, n, site, 0,
                 1.0)
    hit = (x2 != x[:, None]) | (x2 != x2)
    return tl.where(tl.sum(hit.to(tl.int32), 1) > 0, tl.sum(tl.where(hit, x2, 0.0), 1), x)


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
def _put_parts(t, x, col, c0: tl.constexpr):
    """``t`` (rows × 16, in the input dtype) with float32 ``x`` split into three parts of that
    dtype in columns ``c0..c0+2``: ``x − Σ parts`` is within ``u_in³·|x|`` (or the dtype's
    underflow) of zero, so a product of a tile with ``t`` on the tensor cores yields ``x``'s
    weighted sums nearly exactly."""
    dt = t.dtype
    hi = x.to(dt)
    r = x - hi.to(tl.float32)
    mid = r.to(dt)
    lo = (r - mid.to(tl.float32)).to(dt)
    t = tl.where(col == c0, hi[:, None], t)
    t = tl.where(col == c0 + 1, mid[:, None], t)
    return tl.where(col == c0 + 2, lo[:, None], t)


@triton.jit
def _chunk_sums(k, v, KSUM, VCOL, c, bk, rows, valid, S, n_chunks, vcol_scale, H: tl.constexpr, CHUNK: tl.constexpr):
    hs = tl.arange(0, H)
    base = KSUM + ((bk.to(tl.int64) * n_chunks + c) * 2) * H
    tl.store(base + hs, tl.sum(k, 0))
    tl.store(base + H + hs, tl.sum(tl.abs(k), 0))
    dt = v.dtype
    v = v.to(tl.float32)
    vs = tl.sum(v, 1) * vcol_scale  # a power of two (tol.fused_vcol_scale): exact, and no overflow
    va = tl.sum(tl.abs(v), 1) * vcol_scale
    col = tl.arange(0, 16)[None, :]
    t = tl.zeros([CHUNK, 16], tl.float32).to(dt)
    t = _put_parts(t, vs, col, 0)
    t = _put_parts(t, va, col, 3)
    t = tl.where(col == ONES_COL, 1.0, t.to(tl.float32)).to(dt)
    out = VCOL + (bk.to(tl.int64) * S + rows[:, None]) * 16 + col
    tl.store(out, t, mask=valid[:, None])


@triton.jit
def _keep(rows, cols, live, kend, win_left, win_right, MASK, m_off, smt, sms, T, S, HAS_MASK: tl.constexpr):
    """Where the tile's entries are attended (every mask form but the bias)."""
    return _keep_at(rows[:, None], cols[None, :], live[:, None], kend, win_left, win_right, MASK, m_off, smt, sms,
                    T, S, HAS_MASK)


@triton.jit
def _keep_at(r2, c2, live2, kend, win_left, win_right, MASK, m_off, smt, sms, T, S, HAS_MASK: tl.constexpr):
    """:func:`_keep` on a tile whose row and column indices broadcast from ``r2`` and ``c2``."""
    keep = (c2 < kend) & (c2 >= r2 - win_left) & (c2 <= r2 + win_right) & live2
    if HAS_MASK:
        mt = tl.load(MASK + m_off + r2.to(tl.int64) * smt + c2.to(tl.int64) * sms, mask=(r2 < T) & (c2 < S), other=0)
        keep = keep & (mt != 0)
    return keep


@triton.jit
def _ends(QLEN, KLEN, b, T, S, HAS_QLEN: tl.constexpr, HAS_KLEN: tl.constexpr):
    """``(qend, kend)``: batch ``b``'s query and key lengths, clipped to ``T`` and ``S``."""
    qend = T
    if HAS_QLEN:
        qend = tl.minimum(T, tl.load(QLEN + b).to(tl.int32))
    kend = S
    if HAS_KLEN:
        kend = tl.maximum(tl.minimum(S, tl.load(KLEN + b).to(tl.int32)), 0)
    return qend, kend


@triton.jit
def _band(r_lo, r_hi, end, left, right):
    """``[lo, hi)``: the keys that rows ``r_lo..r_hi`` attend (key ``j`` with ``i - left <= j <=
    i + right``, below ``end``); ``hi = lo = 0`` when ``r_hi < r_lo`` (no live row). With the roles
    swapped (keys for rows, ``right`` for ``left``) it gives the rows that attend some keys."""
    lo = tl.maximum(r_lo - left, 0)
    hi = tl.minimum(end, r_hi + right + 1)
    hi = tl.where(r_hi < r_lo, 0, tl.maximum(hi, 0))
    return tl.minimum(lo, hi), hi


@triton.jit
def _tile_sums(KSUM, ksum_off, start_n, n_chunks, H: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """(Σ k, Σ |k|) over the keys of the tile at ``start_n``: the sums of its pre-pass chunks."""
    hs = tl.arange(0, H)
    c = start_n // CHUNK
    ks = tl.zeros([H], tl.float32)
    ka = tl.zeros([H], tl.float32)
    for r in tl.static_range(BLOCK_N // CHUNK):
        there = c + r < n_chunks
        ks += tl.load(KSUM + ksum_off + (c + r) * 2 * H + hs, mask=(hs < H) & there, other=0.0)
        ka += tl.load(KSUM + ksum_off + (c + r) * 2 * H + H + hs, mask=(hs < H) & there, other=0.0)
    return ks, ka


@triton.jit
def _tile(acc, m_raw, l, srow, l2, d, pv, nc, mmax, pred, kacc, kabs, er, keep,
          q, K, V, VCOL, KSUM, BIAS, kv_off, v_off, vcol_off, ksum_off, n_chunks, b_off, sks, skh, svs, svh, sbt,
          sbs, kh,
          start_n, rows, live, S, T, c, scale, FT, FV, n_faults, b, n, ex_tile, ex_arg, ex_mu, ra_rel, ra_mu, ra_tiny,
          H: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, MASKED: tl.constexpr,
          HAS_BIAS: tl.constexpr, HAS_QLEN: tl.constexpr,
          QK: tl.constexpr, DMR: tl.constexpr, PV: tl.constexpr, INJECT: tl.constexpr, UPCAST: tl.constexpr,
          REPLICA_FMA: tl.constexpr, EXPC: tl.constexpr, TMA: tl.constexpr):
    """One tile of keys. ``MASKED``: ``keep`` says which entries count (the qk_row prediction
    takes a 0/1 product with K); otherwise every entry counts, except (``HAS_QLEN``) in rows
    beyond the query length (not ``live``), and the prediction adds the tile's pre-pass sums.

    No branch depends on data inside the loop over tiles: on the H200 (triton 3.6) an ``if``
    around a tile, or around the 0/1 product, made the ``pv_row`` accumulator wrong for H >= 32
    and read out of bounds (docs/kernels.md, "Masks").

    ``TMA``: ``K`` and ``V`` (1), and ``VCOL`` too (2), are tensor descriptors of ``(B, KH, S, ·)``
    (the copy engine reads the tiles, filling keys at or beyond S with zeros) instead of pointers."""
    cols = start_n + tl.arange(0, BLOCK_N)
    hs = tl.arange(0, H)
    kvalid = cols < S
    if TMA:
        k = tl.trans(K.load([b, kh, start_n, 0]).reshape(BLOCK_N, H))  # H × BLOCK_N
        v = V.load([b, kh, start_n, 0]).reshape(BLOCK_N, H)
    else:
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
    # the softmax's logits z in units where exp2(z·cz) is the weight: raw q·k (cz = c), or
    # with a bias scale·q·k + bias (cz = log2 e)
    if HAS_BIAS:
        bt = tl.load(BIAS + b_off + rows[:, None].to(tl.int64) * sbt + cols[None, :].to(tl.int64) * sbs,
                     mask=(rows < T)[:, None] & kvalid[None, :], other=0.0).to(tl.float32)
        z = qk * scale + bt
        cz = LOG2E
    else:
        z = qk
        cz = c
    if MASKED:
        z = tl.where(keep, z, float("-inf"))
    elif HAS_QLEN:
        z = tl.where(live[:, None], z, float("-inf"))
    m_new = tl.maximum(m_raw, tl.max(z, 1))
    # a row with nothing attended so far keeps m = -inf; exp2 then sees -inf, not NaN
    m_use = tl.where(m_new > float("-inf"), m_new, 0.0)
    m_sc = m_use * cz
    # (z − m)·cz is exactly 0 at the row maximum and never positive, so the sum
    # is at least 1 and nothing overflows at any finite logit. The fused
    # multiply-add z·cz − m·cz (one operation instead of two) is off by up to half
    # an ulp of |m·cz| there: from |m·cz| = 2³⁰ on it overflows exp2 or flushes a
    # row to 0. Measured cost and a rejected per-tile switch: docs/kernels.md, M8.
    p = tl.math.exp2((z - m_use[:, None]) * cz)
    # the rescale factor; 1 while the row has attended nothing (then only a fault put anything in l)
    alpha = tl.where(m_new > float("-inf"), tl.math.exp2((m_raw - m_use) * cz), 1.0)
    if INJECT:
        p = _inject(p, rows, cols, FT, FV, n_faults, b, n, SITE_PROBS, 0, 1.0)
        alpha = _inject_rows(alpha, rows, cols, FT, FV, n_faults, b, n, SITE_RESCALE, BLOCK_N)
    if EXPC:  # softmax_exp: Σ log₂ p against Σ of the argument formed again (triton_exp)
        er = tl.maximum(er, exp_tile_ratio(p, z, cz, m_sc, ex_tile, ex_arg, ex_mu, MASKED, BLOCK_N, EXPC))
        er = tl.maximum(er, rescale_ratio(alpha, m_raw, m_new, m_sc, cz, ra_rel, ra_mu, ra_tiny))
    lt = tl.sum(p, 1)
    if INJECT:
        lt = _inject_rows(lt, rows, cols, FT, FV, n_faults, b, n, SITE_ROWSUM, BLOCK_N)
    l = l * alpha + lt
    acc = acc * alpha[:, None]
    if UPCAST:
        pm = _round_bf16(p)
        acc = tl.dot(pm, v.to(tl.float32), acc)
    else:
        pm = p.to(dt)
        acc = tl.dot(pm, v, acc)
    if QK:
        ks, ka = _tile_sums(KSUM, ksum_off, start_n, n_chunks, H, BLOCK_N, CHUNK)
        kabs += ka  # the magnitude: every key of a visited tile (an upper bound when some are masked)
        if MASKED:
            srow += tl.sum(tl.where(keep, qk, 0.0), 1)
            # the attended keys of each row: a 0/1 matrix times K
            if UPCAST:
                kf_sum = tl.dot(keep.to(tl.float32), tl.trans(k).to(tl.float32))
            else:
                kf_sum = tl.dot(keep.to(dt), tl.trans(k))
            pred += tl.sum(q.to(tl.float32) * kf_sum, 1)
        else:
            if HAS_QLEN:
                srow += tl.sum(tl.where(live[:, None], qk, 0.0), 1)
            else:
                srow += tl.sum(qk, 1)
            kacc += ks
    if DMR:
        # the replica: its own argument formula (clamped at 0, see above) and
        # its own rescale factor
        if REPLICA_FMA:
            p2 = _exp2_fma(tl.minimum(z * cz - m_sc[:, None], 0.0))
        else:
            p2 = tl.math.exp2(tl.minimum(z * cz - m_sc[:, None], 0.0))
        if INJECT:
            p2 = _inject(p2, rows, cols, FT, FV, n_faults, b, n, SITE_PROBS, 1, 1.0)
        # exactly 1 where the maximum did not rise: the compiler may contract m·cz − m_sc into one
        # fused multiply-add, which leaves the rounding error of m_sc (u·μ) at every tile, not only
        # at the rises the threshold counts (docs/kernels.md, "softmax_dmr at large logits")
        alpha2 = tl.where(m_new > m_raw, tl.math.exp2(tl.minimum(m_raw * cz - m_sc, 0.0)), 1.0)
        l2t = tl.sum(p2, 1)
        l2 = l2 * alpha2 + l2t
        d = d * alpha + tl.abs(lt - l2t)
    if DMR or PV or EXPC:
        nc += ((m_new > m_raw) & (m_raw > float("-inf"))).to(tl.int32)
        mmax = tl.maximum(mmax, tl.abs(m_sc))
    if PV or EXPC:  # (softmax_exp reads P̂·1 in the column of ones)
        if TMA == 2:
            vc = VCOL.load([b, kh, start_n, 0]).reshape(BLOCK_N, 16)
        else:
            vc = tl.load(VCOL + vcol_off + cols[:, None].to(tl.int64) * 16 + tl.arange(0, 16)[None, :],
                         mask=kvalid[:, None], other=0.0)
        if UPCAST:
            pv = tl.dot(pm, vc.to(tl.float32), pv * alpha[:, None])
        else:
            pv = tl.dot(pm, vc, pv * alpha[:, None])
    return acc, m_new, l, srow, l2, d, pv, nc, mmax, pred, kacc, kabs, er


@triton.jit
def _forward(Q, K, V, O, LSE, KSUM, VCOL, STATS, FLAGS, COUNT, FT, FV, REDO, MASK, BIAS, QLEN, KLEN,
             sqb, sqn, sqt, sqh, skb, skk, sks, skh, svb, svk, svs, svh, sob, son, sot, soh,
             smb, smn, smt, sms, sbb, sbn, sbt, sbs,
             N, G, KH, T, S, n_chunks, n_faults: tl.constexpr, plane, bn_offset, scale, win_left, win_right,
             coef_qk, allow_qk, coef_pv, coef_pv_nc, allow_pv, dmr_a0, dmr_a1, dmr_a2, allow_dmr, vcol_unscale,
             ex_tile, ex_arg, ex_mu, ra_rel, ra_mu, ra_tiny, su_rel, su_rescale, su_key, su_tiny,
             H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
             HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_KLEN: tl.constexpr,
             QK: tl.constexpr, DMR: tl.constexpr, PV: tl.constexpr,
             INJECT: tl.constexpr, REDO_MODE: tl.constexpr,
             UPCAST: tl.constexpr, SIGNED: tl.constexpr, REPLICA_FMA: tl.constexpr, STORE_LSE: tl.constexpr,
             EXPC: tl.constexpr, TMA: tl.constexpr = 0):
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
    ksum_off = ((b.to(tl.int64) * KH + kh) * n_chunks) * 2 * H
    m_off = b.to(tl.int64) * smb + n.to(tl.int64) * smn
    b_off = b.to(tl.int64) * sbb + n.to(tl.int64) * sbn

    # ---- the band of keys any live row of this block attends: query i attends keys
    # i - win_left <= j <= i + win_right (is_causal: win_right <= 0) below kend
    qend, kend = _ends(QLEN, KLEN, b, T, S, HAS_QLEN, HAS_KLEN)
    live = rows < qend
    r_lo = mb * BLOCK_M
    r_hi = tl.minimum(r_lo + BLOCK_M, qend) - 1  # the last live row
    lo, hi = _band(r_lo, r_hi, kend, win_left, win_right)
    t_start = lo // BLOCK_N
    t_end = (hi + BLOCK_N - 1) // BLOCK_N
    # tiles every live row attends in full: no element mask, the pre-pass sums for qk_row
    f0 = tl.maximum(t_start, (tl.maximum(r_hi - win_left, 0) + BLOCK_N - 1) // BLOCK_N)
    f1 = tl.minimum(tl.minimum(t_end, tl.maximum(r_lo + win_right + 1, 0) // BLOCK_N), kend // BLOCK_N)
    if HAS_MASK:  # a dense mask: every tile of the band is masked per element
        f0 = t_start
        f1 = t_start
    if INJECT:  # a planned fault may sit in any probability, as in the unfused path: every tile is computed
        t_start = 0
        t_end = (S + BLOCK_N - 1) // BLOCK_N
        f0 = tl.maximum(f0, t_start)
    f0 = tl.minimum(f0, t_end)
    f1 = tl.maximum(f1, f0)

    acc = tl.zeros([BLOCK_M, H], tl.float32)
    m_raw = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    srow = tl.zeros([BLOCK_M], tl.float32)
    l2 = tl.zeros([BLOCK_M], tl.float32)
    d = tl.zeros([BLOCK_M], tl.float32)
    pv = tl.zeros([BLOCK_M, 16], tl.float32)
    nc = tl.zeros([BLOCK_M], tl.int32)
    mmax = tl.zeros([BLOCK_M], tl.float32)
    pred = tl.zeros([BLOCK_M], tl.float32)
    kacc = tl.zeros([H], tl.float32)
    kabs = tl.zeros([H], tl.float32)
    er = tl.zeros([BLOCK_M], tl.float32)

    for t in range(t_start, f0):
        start_n = t * BLOCK_N
        keep = _keep(rows, start_n + tl.arange(0, BLOCK_N), live, kend, win_left, win_right, MASK, m_off, smt,
                     sms, T, S, HAS_MASK)
        acc, m_raw, l, srow, l2, d, pv, nc, mmax, pred, kacc, kabs, er = _tile(
            acc, m_raw, l, srow, l2, d, pv, nc, mmax, pred, kacc, kabs, er, keep,
            q, K, V, VCOL, KSUM, BIAS, kv_off, v_off, vcol_off, ksum_off, n_chunks, b_off, sks, skh, svs, svh, sbt,
            sbs, kh, start_n, rows, live, S, T, c, scale, FT, FV, n_faults, b, n, ex_tile, ex_arg, ex_mu, ra_rel, ra_mu, ra_tiny,
            H, BLOCK_N, CHUNK, True, HAS_BIAS, HAS_QLEN, QK, DMR, PV, INJECT, UPCAST, REPLICA_FMA, EXPC, TMA)
    for t in range(f0, f1):
        acc, m_raw, l, srow, l2, d, pv, nc, mmax, pred, kacc, kabs, er = _tile(
            acc, m_raw, l, srow, l2, d, pv, nc, mmax, pred, kacc, kabs, er, rows,
            q, K, V, VCOL, KSUM, BIAS, kv_off, v_off, vcol_off, ksum_off, n_chunks, b_off, sks, skh, svs, svh, sbt,
            sbs, kh, t * BLOCK_N, rows, live, S, T, c, scale, FT, FV, n_faults, b, n, ex_tile, ex_arg, ex_mu, ra_rel, ra_mu, ra_tiny,
            H, BLOCK_N, CHUNK, False, HAS_BIAS, HAS_QLEN, QK, DMR, PV, INJECT, UPCAST, REPLICA_FMA, EXPC, TMA)
    for t in range(f1, t_end):
        start_n = t * BLOCK_N
        keep = _keep(rows, start_n + tl.arange(0, BLOCK_N), live, kend, win_left, win_right, MASK, m_off, smt,
                     sms, T, S, HAS_MASK)
        acc, m_raw, l, srow, l2, d, pv, nc, mmax, pred, kacc, kabs, er = _tile(
            acc, m_raw, l, srow, l2, d, pv, nc, mmax, pred, kacc, kabs, er, keep,
            q, K, V, VCOL, KSUM, BIAS, kv_off, v_off, vcol_off, ksum_off, n_chunks, b_off, sks, skh, svs, svh, sbt,
            sbs, kh, start_n, rows, live, S, T, c, scale, FT, FV, n_faults, b, n, ex_tile, ex_arg, ex_mu, ra_rel, ra_mu, ra_tiny,
            H, BLOCK_N, CHUNK, True, HAS_BIAS, HAS_QLEN, QK, DMR, PV, INJECT, UPCAST, REPLICA_FMA, EXPC, TMA)

    # a row with nothing attended (rows beyond the query length included) has output zero
    inv = tl.where(l > 0.0, 1.0 / l, 0.0)
    o = acc * inv[:, None]
    if STORE_LSE:  # for the backward: p_ij = exp2(z_ij·c_z − LSE_i); +inf where nothing is attended
        cz_f = LOG2E if HAS_BIAS else c
        m_f = tl.where(m_raw > float("-inf"), m_raw, 0.0)
        lse = tl.where(l > 0.0, m_f * cz_f + tl.math.log2(tl.where(l > 0.0, l, 1.0)), float("inf"))
        tl.store(LSE + (b.to(tl.int64) * N + n) * T + rows, lse, mask=rvalid)
    if INJECT:
        o = _inject(o, rows, hs, FT, FV, n_faults, b, n, SITE_OUT, 0, 1.0)
    o_st = _round_bf16(o) if UPCAST else o
    tl.store(O + b.to(tl.int64) * sob + n.to(tl.int64) * son + rows[:, None].to(tl.int64) * sot
             + hs[None, :] * soh, o_st.to(O.dtype.element_ty), mask=rvalid[:, None])

    if QK:
        # ---- qk_row: Σ_j s_ij over the attended keys against q_i·(Σ over those keys of k)
        qf = q.to(tl.float32)
        pred += tl.sum(qf * kacc[None, :], 1)
        mag = tl.sum(tl.abs(qf) * kabs[None, :], 1)
        diff = tl.where(live, (srow - pred) * scale, 0.0)
        thr = tl.where(live, (coef_qk * mag + allow_qk) * scale, 0.0)
        _verdict(STATS, FLAGS, COUNT, plane, b, n, N, T, rows, rvalid, 0, diff, thr, SIGNED)
    nc_f = nc.to(tl.float32)
    if DMR:
        # ---- softmax_dmr: replica sums, plus range checks (finite max and sums, l >= 1);
        # a row with nothing attended has l = l' = 0 and nothing to judge
        thr = dmr_a0 + dmr_a1 * nc_f + dmr_a2 * mmax * (1.0 + nc_f) + allow_dmr * inv
        r = (d + tl.abs(l - l2)) * inv
        ok = (m_raw < float("inf")) & (l < float("inf")) & (l2 < float("inf"))
        ok = ok & (l * (1.0 + thr) >= 1.0)
        r = tl.where(ok, r, float("inf"))
        r = tl.where((m_raw == float("-inf")) & (l == 0.0) & (l2 == 0.0), 0.0, r)
        _verdict(STATS, FLAGS, COUNT, plane, b, n, N, T, rows, rvalid, 1, r, thr, False)
    if PV:
        # ---- pv_row: Σ_h o_ih against (P̂·v̄)_i / l_i
        ccol = tl.arange(0, 16)[None, :]
        pvp = tl.sum(tl.where(ccol < 3, pv, 0.0), 1) * (inv * vcol_unscale)
        pvw = tl.sum(tl.where((ccol >= 3) & (ccol < 6), pv, 0.0), 1) * (inv * vcol_unscale)
        diff = tl.sum(o, 1) - pvp
        thr = (coef_pv + coef_pv_nc * nc_f) * pvw + allow_pv
        _verdict(STATS, FLAGS, COUNT, plane, b, n, N, T, rows, rvalid, 2, diff, thr, SIGNED)
    if EXPC:
        # ---- softmax_exp: the worst tile's |L − R| in units of its bound, and l against P̂·1 (the row
        # sum and the conversion of P) in units of theirs; a row whose sum is not finite fails
        ones = tl.sum(tl.where(tl.arange(0, 16)[None, :] == ONES_COL, pv, 0.0), 1)
        er = tl.maximum(er, tl.abs(ones - l) / ((su_rel + su_rescale * nc_f) * l + su_key * S + su_tiny))
        r = tl.where(l < float("inf"), er, float("inf"))
        _verdict(STATS, FLAGS, COUNT, plane, b, n, N, T, rows, rvalid, 3, r, tl.full([BLOCK_M], 1.0, tl.float32),
                 False)
