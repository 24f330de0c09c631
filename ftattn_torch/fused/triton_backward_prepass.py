"""The fused backward's prepass kernels (``implementation="triton"``): what the main kernels of
:mod:`.triton_backward` read per query row and per key. Legend of ``ftattn_spec.axes``.

``_bwd_rows`` (grid: query blocks × ``B·N``): ``D_i = Σ_h dO_ih·O_ih`` into ``DD`` (float32,
  ``(B, N, T)``); with ``CHECKS`` also the checks' operands for the rows: ``RB`` (float32
  ``(4, B·N, query blocks, H)``: Σ q, Σ |q|, Σ dO, Σ |dO| over the block's rows), the
  weights ``WQ`` (input dtype, ``(B, N, T, 16)``: per row Σ_h q, Σ_h |q|, Σ_h dO, Σ_h |dO|,
  each scaled by σ and split into three parts, a column of ones, and ‖dO_i‖∞ in column 13;
  ``_weights``), and ``DOB`` (float32 ``(B·N, query blocks)``: Σ_i ‖dO_i‖∞ over the block).
``_bwd_keys`` (grid: key blocks × ``B·K``, only with ``CHECKS``): the same for the keys:
  ``KB`` (Σ k, Σ |k|, Σ v, Σ |v| over the block's keys), ``WK`` (Σ_h k, Σ_h |k|, Σ_h |v|) and
  ``VB`` (float32 ``(B·K, key blocks)``: max_j Σ_h |v_jh| over the block).

``DOB`` and ``VB`` give ``bwd_ds_col``'s two bounds (the runner sums and maxes them per head
group) without another pass over dO and V.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernel import _put_parts


@triton.jit
def _store_block_sums(RB, x, b_at, plane_blk, which: tl.constexpr):
    """Σ x and Σ |x| over the block's rows (``x`` is zero at invalid rows) into planes ``which``
    and ``which + 1`` of ``RB``."""
    tl.store(RB + which * plane_blk + b_at, tl.sum(x, 0))
    tl.store(RB + (which + 1) * plane_blk + b_at, tl.sum(tl.abs(x), 0))


@triton.jit
def _weights(x, y, z, sigma, dt, ROWS: tl.constexpr):
    """The 16 columns the gradients' checks multiply on the tensor cores (module docstring):
    ``Σ_h x``, ``Σ_h |x|``, ``Σ_h y``, ``Σ_h |z|`` of each row, scaled by ``sigma`` and split
    into three parts of ``dt`` each (columns 0–11), and ones (column 12)."""
    col = tl.arange(0, 16)[None, :]
    t = tl.where(col == 12, 1.0, tl.zeros([ROWS, 16], tl.float32)).to(dt)
    t = _put_parts(t, tl.sum(x, 1) * sigma, col, 0)
    t = _put_parts(t, tl.sum(tl.abs(x), 1) * sigma, col, 3)
    t = _put_parts(t, tl.sum(y, 1) * sigma, col, 6)
    return _put_parts(t, tl.sum(tl.abs(z), 1) * sigma, col, 9)


@triton.jit
def _load_rows(X, b, n, at, hs, sxb, sxn, sxt, sxh, valid):
    """The ``(rows, H)`` tile of ``X[b, n]`` at rows ``at`` (a column of int64 indices); zero where
    a row is not ``valid``. In the input dtype."""
    return tl.load(X + b.to(tl.int64) * sxb + n.to(tl.int64) * sxn + at * sxt + hs[None, :] * sxh,
                   mask=valid[:, None], other=0.0)


@triton.jit
def _block_rows(blk, bh, heads, BLOCK: tl.constexpr, length):
    """Program ``(blk, bh)``'s batch, head, rows (or keys) of its block, which of them exist,
    and those indices as an int64 column."""
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    return bh // heads, bh % heads, rows, rows < length, rows[:, None].to(tl.int64)


@triton.jit
def _bwd_rows(Q, DO, O, DD, RB, WQ, DOB, sqb, sqn, sqt, sqh, sdb, sdn, sdt, sdh, sob, son, sot, soh,
              N, T, bn_offset, plane_blk, sigma, H: tl.constexpr, BLOCK_M: tl.constexpr, CHECKS: tl.constexpr):
    mb = tl.program_id(0)
    bn = tl.program_id(1) + bn_offset
    b, n, rows, rvalid, at = _block_rows(mb, bn, N, BLOCK_M, T)
    hs = tl.arange(0, H)
    do_in = _load_rows(DO, b, n, at, hs, sdb, sdn, sdt, sdh, rvalid)
    do = do_in.to(tl.float32)
    o = _load_rows(O, b, n, at, hs, sob, son, sot, soh, rvalid).to(tl.float32)
    r_at = bn.to(tl.int64) * T + rows
    tl.store(DD + r_at, tl.sum(do * o, 1), mask=rvalid)
    if CHECKS:
        q = _load_rows(Q, b, n, at, hs, sqb, sqn, sqt, sqh, rvalid).to(tl.float32)
        b_at = (bn.to(tl.int64) * tl.num_programs(0) + mb) * H + hs
        _store_block_sums(RB, q, b_at, plane_blk, 0)
        _store_block_sums(RB, do, b_at, plane_blk, 2)
        # columns: Σ q (0–2), Σ |q| (3–5), Σ do (6–8), Σ |do| (9–11), 1 (12)
        w = _weights(q, do, do, sigma, do_in.dtype, BLOCK_M)
        # column 13: ‖dO_i‖∞, for the bwd_ds_col magnitude (a value of the input dtype: exact)
        w = tl.where(tl.arange(0, 16)[None, :] == 13, tl.max(tl.abs(do), 1)[:, None].to(do_in.dtype), w)
        tl.store(WQ + r_at[:, None] * 16 + tl.arange(0, 16)[None, :], w, mask=rvalid[:, None])
        tl.store(DOB + bn.to(tl.int64) * tl.num_programs(0) + mb, tl.sum(tl.max(tl.abs(do), 1), 0))


@triton.jit
def _bwd_keys(K, V, KB, WK, VB, skb, skk, sks, skh, svb, svk, svs, svh, KH, S, bk_offset, plane_blk, sigma,
              H: tl.constexpr, BLOCK_N: tl.constexpr):
    nb = tl.program_id(0)
    bk = tl.program_id(1) + bk_offset
    b, kh, cols, kvalid, at = _block_rows(nb, bk, KH, BLOCK_N, S)
    hs = tl.arange(0, H)
    k_in = _load_rows(K, b, kh, at, hs, skb, skk, sks, skh, kvalid)
    k = k_in.to(tl.float32)
    v = _load_rows(V, b, kh, at, hs, svb, svk, svs, svh, kvalid).to(tl.float32)
    b_at = (bk.to(tl.int64) * tl.num_programs(0) + nb) * H + hs
    _store_block_sums(KB, k, b_at, plane_blk, 0)
    _store_block_sums(KB, v, b_at, plane_blk, 2)
    # columns: Σ k (0–2), Σ |k| (3–5), Σ |v| (6–8; 9–11 unused), 1 (12)
    w = _weights(k, tl.abs(v), v, sigma, k_in.dtype, BLOCK_N)
    tl.store(WK + (bk.to(tl.int64) * S + cols)[:, None] * 16 + tl.arange(0, 16)[None, :], w, mask=kvalid[:, None])
    tl.store(VB + bk.to(tl.int64) * tl.num_programs(0) + nb, tl.max(tl.sum(tl.abs(v), 1), 0))
