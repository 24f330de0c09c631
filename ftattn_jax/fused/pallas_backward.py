"""The portable Pallas backward of ``implementation="pallas"``: flash-attention style, checked.

The algebra, the checks and their thresholds are those of the Triton backward of
``ftattn_torch`` (``ftattn_torch/fused/triton_backward.py``; ``docs/kernels.md``, "The fused
backward"; ``ftattn_spec.backward_tolerances``). It lowers through Pallas' Triton backend on
a CUDA GPU, or runs in interpret mode anywhere. Legend of ``ftattn_spec.axes``: q ``B T N H``,
k and v ``B S K H``; query head ``n`` reads kv head ``n // G``.

The forward saved each row's base-2 log-sum-exp ``LSE`` (float32 ``(B, N, T)``, ``+inf`` for a
row that attends nothing), so ``p_ij = exp2(z_ij·c_z − LSE_i)`` is recomputed tile by tile.
Side inputs, computed in XLA (:func:`.backward_inputs.side_sums`): ``D_i = Σ_h dO_ih·O_ih``; with the checks,
the block sums of Q, |Q|, dO, |dO| (per query block) and of K, |K|, V, |V| (per key block),
and the 16-column weights of the gradients' checks: per row Σ_h q, Σ_h |q|, Σ_h dO, Σ_h |dO|
(per key Σ_h k, Σ_h |k|, Σ_h |v|), each scaled by σ and split into three parts of the input
dtype, and a column of ones.

Two kernels:

``_dkdv`` (grid: key blocks × B × N): for its keys and one query head, over the query blocks
  that attend them, ``dV += P̃ᵀ·dO`` and ``dK += dS̃ᵀ·Q`` with ``dS = P ∘ (dO·Vᵀ − D)``, in
  tiles of keys × queries (the checks' sums over queries then stay within a warp). It
  writes float32 partial gradients per query head, ``(B, S, N, H)``, which XLA sums over
  each group of ``G`` heads (no atomics; ``G`` = 1 needs no sum), and its key checks per
  (batch, query head, key): ``bwd_qk_col``, ``bwd_dp_col``, ``bwd_dk``, ``bwd_dv``,
  ``bwd_ds_col``, and each key's sum of P over the rows, which XLA totals per head
  (``bwd_softmax_kv``; per query head here, per head group in PyTorch).
``_dq`` (grid: query blocks × B × N): ``dQ += dS̃·K`` over the keys its rows attend, and the
  row checks ``bwd_qk_row``, ``bwd_dp_row``, ``bwd_softmax``, ``bwd_dq``, ``bwd_d``,
  ``bwd_ds``; with a bias it also writes dS (float32 ``(B, N, T, S)``: the bias gradient).

Faults at the backward's sites (``ftattn_spec.faults.BACKWARD_SITES``) are injected inside
the kernels from the forward's fault table: replica 0 is the dQ kernel's evaluation, 1 the
dK/dV kernel's; ``bwd_dk``/``bwd_dv`` name the kv head and go into the partial gradient of
the group's first query head.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ftattn_spec import faults as spec_faults

from . import compat
from .backward_inputs import W, BackwardBlocks, BackwardConfig, backward_config, side_sums
from .pallas_kernel import _dense, _inject
from .tiles import _band, _column, _ends, _exp2_fma, _exponent, _probs
from .side_inputs import pad_to

__all__ = ["BackwardBlocks", "BackwardConfig", "BackwardOutput", "GROUP_CHECKS", "KEY_CHECKS", "ROW_CHECKS",
           "backward_config", "launch"]

F32 = jnp.float32
_SITE = {s: spec_faults.SITES.index(s) for s in spec_faults.BACKWARD_SITES}
#: the backward's checks, in the order of the kernels' outputs
ROW_CHECKS = ("bwd_qk_row", "bwd_dp_row", "bwd_softmax", "bwd_dq", "bwd_d", "bwd_ds")  # (B, N, T), _dq
#: (B, N, S), _dkdv
KEY_CHECKS = ("bwd_qk_col", "bwd_dp_col", "bwd_dk", "bwd_dv", "bwd_ds_col", "bwd_softmax_col")
GROUP_CHECKS = ("bwd_softmax_kv",)  # (B, N)
_SOFTMAX = ROW_CHECKS.index("bwd_softmax")


def _optional_refs(it, cfg: BackwardConfig):
    """The mask, bias, length and fault-table refs that follow a kernel's fixed inputs (None
    where ``cfg`` has none), in :func:`launch`'s order."""
    return tuple(next(it) if on else None for on in (cfg.has_mask, cfg.has_bias, cfg.has_qlen, cfg.has_klen,
                                                      cfg.n_faults, cfg.n_faults))


def _dkdv_kernel(*refs, cfg: BackwardConfig, H: int):
    it = iter(refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, dd_ref = (next(it) for _ in range(6))
    rb_ref, wq_ref, vmax_ref, totdo_ref = (next(it) for _ in range(4)) if cfg.checks else (None,) * 4
    mask_ref, bias_ref, qlen_ref, klen_ref, ft_ref, fv_ref = _optional_refs(it, cfg)
    dk_ref, dv_ref = next(it), next(it)
    outs = list(it)

    BM, BN = cfg.block_m, cfg.block_n
    j, b, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k = k_ref[...]
    v = v_ref[...]
    dt = k.dtype
    cols = j * BN + lax.broadcasted_iota(jnp.int32, (BN,), 0)
    left, right = cfg.band
    qend, kend = _ends(cfg, qlen_ref, klen_ref, b)
    c_lo = j * BN
    lo, hi = _band(c_lo, jnp.minimum(c_lo + BN, kend) - 1, qend, right, left)
    zf = jnp.zeros((BN,), F32)
    zw = jnp.zeros((BN, W), F32)
    zh = jnp.zeros((H,), F32)

    def step(mb, carry):
        dk, dv, s_act, p_act, p_col, x_dev, r_col, e_p, e_d, e_a, qs, qa, ds_, da = carry
        start = pl.multiple_of(mb * BM, BM)
        rows = start + lax.broadcasted_iota(jnp.int32, (BM,), 0)
        q = q_ref[pl.ds(start, BM), :]
        do = do_ref[pl.ds(start, BM), :]
        lse = lse_ref[pl.ds(start, BM)]
        di = dd_ref[pl.ds(start, BM)]
        # tiles are keys × queries (transposed), so that the checks' sums over the queries are
        # sums along a row (within a warp), as in the Triton backward
        s = compat.dot(k, q, trans_b=True)  # BN × BM
        inject = lambda x, site: _inject(x.T, rows, cols, ft_ref, fv_ref, cfg, b, n, _SITE[site], 1,  # noqa: E731
                                         cfg.scale if site == "bwd_scores" else 1.0).T
        if cfg.n_faults:
            s = inject(s, "bwd_scores")
        x, keep = _exponent(s, rows[None, :], cols[:, None], (rows < qend)[None, :], kend, lse[None, :], cfg,
                            mask_ref[pl.ds(start, BM), :].T if cfg.has_mask else None,
                            bias_ref[pl.ds(start, BM), :].T if cfg.has_bias else None)
        p = jnp.where(keep, jnp.exp2(x), 0.0)
        if cfg.n_faults:
            p = inject(p, "bwd_probs")
        pm = p.astype(dt)
        dv = dv + compat.dot(pm, do)
        dp = compat.dot(v, do, trans_b=True)
        if cfg.n_faults:
            dp = inject(dp, "bwd_dp")
        ds = p * (dp - di[None, :])
        if cfg.n_faults:
            ds = inject(ds, "bwd_ds")
        dsm = ds.astype(dt)
        dk = dk + compat.dot(dsm, q)
        if cfg.checks:
            w = wq_ref[pl.ds(start, BM), :]
            e_p = e_p + compat.dot(pm, w)
            e_d = e_d + compat.dot(dsm, w)
            e_a = e_a + compat.dot(jnp.abs(dsm), w)
            s_act = s_act + jnp.sum(s, axis=1)
            p_act = p_act + jnp.sum(dp, axis=1)
            p_col = p_col + jnp.sum(p, axis=1)
            # bwd_softmax_col: P against a second exponential on the FMA pipe, per key and tile
            x_dev = x_dev + jnp.abs(jnp.sum(p - jnp.where(keep, _exp2_fma(x), 0.0), axis=1))
            r_col = r_col + jnp.sum(ds - (p * dp - p * di[None, :]), axis=1)
            qs, qa = qs + rb_ref[mb, 0, :], qa + rb_ref[mb, 1, :]
            ds_, da = ds_ + rb_ref[mb, 2, :], da + rb_ref[mb, 3, :]
        return dk, dv, s_act, p_act, p_col, x_dev, r_col, e_p, e_d, e_a, qs, qa, ds_, da

    carry = (jnp.zeros((BN, H), F32), jnp.zeros((BN, H), F32), zf, zf, zf, zf, zf, zw, zw, zw, zh, zh, zh, zh)
    dk, dv, s_act, p_act, p_col, x_dev, r_col, e_p, e_d, e_a, qs, qa, ds_, da = lax.fori_loop(
        lo // BM, (hi + BM - 1) // BM, step, carry)
    if cfg.n_faults:  # a fault names the kv head: the group's first query head carries it
        hs = lax.broadcasted_iota(jnp.int32, (H,), 0)
        kh = jnp.where(n % cfg.G == 0, n // cfg.G, -1)
        dk = _inject(dk, cols, hs, ft_ref, fv_ref, cfg, b, kh, _SITE["bwd_dk"], 0, cfg.scale)
        dv = _inject(dv, cols, hs, ft_ref, fv_ref, cfg, b, kh, _SITE["bwd_dv"], 0, 1.0)
    dk_ref[...] = dk * cfg.scale
    dv_ref[...] = dv
    if cfg.checks:
        co = cfg.coef
        kf, vf = k.astype(F32), v.astype(F32)
        sig = co.sigma
        pairs = (
            ((s_act - jnp.sum(kf * qs[None, :], 1)) * cfg.scale,
             (co.qk_col * jnp.sum(jnp.abs(kf) * qa[None, :], 1) + co.allow_col) * cfg.scale),
            (p_act - jnp.sum(vf * ds_[None, :], 1), co.dp_col * jnp.sum(jnp.abs(vf) * da[None, :], 1) + co.allow_col),
            ((jnp.sum(dk, 1) - _column(e_d, 0, 3) / sig) * cfg.scale,
             (co.dk * _column(e_a, 3, 3) / sig + co.allow_col + co.under * _column(e_a, 12, 1)) * cfg.scale),
            (jnp.sum(dv, 1) - _column(e_p, 6, 3) / sig,
             co.dv * _column(e_p, 9, 3) / sig + co.allow_col + co.under * _column(e_p, 12, 1)),
            # dS against p·dp − p·D; Σ_i p_ij·(|dp_ij| + |D_i|) <= (‖v_j‖₁ + max ‖v‖₁)·Σ_i p_ij·‖dO_i‖∞
            (r_col, co.ds * (jnp.sum(jnp.abs(vf), 1) + vmax_ref[b, n // cfg.G] * co.mag_up)
             * (_column(e_p, 13, 1) * co.mag_up + co.under * _column(e_p, 12, 1) + co.p_under * totdo_ref[b, n])
             + co.allow_col),
            (x_dev, co.softmax_col * p_col + co.allow_col),
        )
        o = iter(outs)
        for diff, thr in pairs:  # (residual, threshold): what gradients.py judges
            next(o)[...] = jnp.abs(diff)
            next(o)[...] = thr
        next(o)[...] = p_col


def _dq_kernel(*refs, cfg: BackwardConfig, H: int):
    it = iter(refs)
    q_ref, k_ref, v_ref, do_ref, o_ref, lse_ref, dd_ref = (next(it) for _ in range(7))
    kb_ref, wk_ref = (next(it), next(it)) if cfg.checks else (None, None)
    mask_ref, bias_ref, qlen_ref, klen_ref, ft_ref, fv_ref = _optional_refs(it, cfg)
    dq_ref = next(it)
    ds_ref = next(it) if cfg.has_bias else None
    outs = list(it)

    BM, BN = cfg.block_m, cfg.block_n
    i, b, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q = q_ref[...]
    do = do_ref[...]
    dt = q.dtype
    rows = i * BM + lax.broadcasted_iota(jnp.int32, (BM,), 0)
    lse = lse_ref[...]
    di = dd_ref[...]
    left, right = cfg.band
    qend, kend = _ends(cfg, qlen_ref, klen_ref, b)
    live = rows < qend
    r_lo = i * BM
    lo, hi = _band(r_lo, jnp.minimum(r_lo + BM, qend) - 1, kend, left, right)
    zr = jnp.zeros((BM,), F32)
    zw = jnp.zeros((BM, W), F32)
    zh = jnp.zeros((H,), F32)
    if cfg.has_bias:  # entries outside the band get no gradient: zeros first, tile by tile
        def clear(t, c):
            ds_ref[:, pl.ds(pl.multiple_of(t * BN, BN), BN)] = jnp.zeros((BM, BN), F32)
            return c

        lax.fori_loop(0, ds_ref.shape[1] // BN, clear, 0)

    def step(t, carry):
        dq, s_act, p_act, psum, r_sum, e_d, e_a, e_p, ks, ka, vs, va = carry
        start = pl.multiple_of(t * BN, BN)
        cols = start + lax.broadcasted_iota(jnp.int32, (BN,), 0)
        k = k_ref[pl.ds(start, BN), :]
        v = v_ref[pl.ds(start, BN), :]
        s = compat.dot(q, k, trans_b=True)
        if cfg.n_faults:
            s = _inject(s, rows, cols, ft_ref, fv_ref, cfg, b, n, _SITE["bwd_scores"], 0, cfg.scale)
        p = _probs(s, rows[:, None], cols[None, :], live[:, None], kend, lse[:, None], cfg,
                   mask_ref[:, pl.ds(start, BN)] if cfg.has_mask else None,
                   bias_ref[:, pl.ds(start, BN)] if cfg.has_bias else None)
        if cfg.n_faults:
            p = _inject(p, rows, cols, ft_ref, fv_ref, cfg, b, n, _SITE["bwd_probs"], 0, 1.0)
        dp = compat.dot(do, v, trans_b=True)
        if cfg.n_faults:
            dp = _inject(dp, rows, cols, ft_ref, fv_ref, cfg, b, n, _SITE["bwd_dp"], 0, 1.0)
        ds = p * (dp - di[:, None])
        if cfg.n_faults:
            ds = _inject(ds, rows, cols, ft_ref, fv_ref, cfg, b, n, _SITE["bwd_ds"], 0, 1.0)
        dsm = ds.astype(dt)
        dq = dq + compat.dot(dsm, k)
        if cfg.has_bias:
            ds_ref[:, pl.ds(start, BN)] = ds
        if cfg.checks:
            w = wk_ref[pl.ds(start, BN), :]
            e_d = e_d + compat.dot(dsm, w)
            e_a = e_a + compat.dot(jnp.abs(dsm), w)
            e_p = e_p + compat.dot(p.astype(dt), w)
            s_act = s_act + jnp.sum(s, axis=1)
            p_act = p_act + jnp.sum(dp, axis=1)
            psum = psum + jnp.sum(p, axis=1)
            r_sum = r_sum + jnp.sum(ds - (p * dp - p * di[:, None]), axis=1)
            ks, ka = ks + kb_ref[t, 0, :], ka + kb_ref[t, 1, :]
            vs, va = vs + kb_ref[t, 2, :], va + kb_ref[t, 3, :]
        return dq, s_act, p_act, psum, r_sum, e_d, e_a, e_p, ks, ka, vs, va

    carry = (jnp.zeros((BM, H), F32), zr, zr, zr, zr, zw, zw, zw, zh, zh, zh, zh)
    dq, s_act, p_act, psum, r_sum, e_d, e_a, e_p, ks, ka, vs, va = lax.fori_loop(
        lo // BN, (hi + BN - 1) // BN, step, carry)
    if cfg.n_faults:
        hs = lax.broadcasted_iota(jnp.int32, (H,), 0)
        dq = _inject(dq, rows, hs, ft_ref, fv_ref, cfg, b, n, _SITE["bwd_dq"], 0, cfg.scale)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)
    if cfg.checks:
        co = cfg.coef
        sig = co.sigma
        qf, dof = q.astype(F32), do.astype(F32)
        of = o_ref[...].astype(F32)
        attended = lse < jnp.inf
        soft = jnp.where(attended, co.softmax0 + co.softmax_mu * jnp.abs(lse), 0.0)
        dmax = jnp.max(jnp.abs(dof), axis=1)
        pw = _column(e_p, 6, 3) / sig * co.mag_up + co.under * _column(e_p, 12, 1) + co.p_under * jnp.sum(va)
        pairs = (
            ((s_act - jnp.sum(qf * ks[None, :], 1)) * cfg.scale,
             (co.qk_row * jnp.sum(jnp.abs(qf) * ka[None, :], 1) + co.allow_row) * cfg.scale),
            (p_act - jnp.sum(dof * vs[None, :], 1), co.dp_row * jnp.sum(jnp.abs(dof) * va[None, :], 1) + co.allow_row),
            # partial: the signed Σ p of this block's keys, added over the blocks by the caller
            (psum if cfg.partial else psum - jnp.where(attended, 1.0, 0.0), soft + co.allow_row),
            ((jnp.sum(dq, 1) - _column(e_d, 0, 3) / sig) * cfg.scale,
             (co.dq * _column(e_a, 3, 3) / sig + co.allow_row + co.under * _column(e_a, 12, 1)) * cfg.scale),
            (jnp.sum(dof * of, 1) - di, co.d * jnp.sum(jnp.abs(dof * of), 1) + co.allow_row),
            (r_sum, co.ds * (dmax * pw + jnp.abs(di) * psum) + co.allow_row),
        )
        o = iter(outs)
        for i, (diff, thr) in enumerate(pairs):  # (residual, threshold): what gradients.py judges
            next(o)[...] = diff if cfg.partial and i == _SOFTMAX else jnp.abs(diff)
            next(o)[...] = thr


class BackwardOutput(NamedTuple):
    """What :func:`launch` returns, padding cut off: the gradients, the bias gradient dS
    (float32 ``(B, N, T, S)``, or None), and without checks None for the rest.

    ``rows``: (residual, threshold) float32 ``(B, N, T)`` per check of ``ROW_CHECKS``;
    ``keys``: the same ``(B, N, S)`` per ``KEY_CHECKS``; ``cols``: each key's sum of P over one
    head's rows, float32 ``(B, N, S)``."""

    dq: jax.Array
    dk: jax.Array
    dv: jax.Array
    ds: jax.Array | None
    rows: tuple | None
    keys: tuple | None
    cols: jax.Array | None


def _whole(x):
    return pl.BlockSpec(x.shape, lambda a, b, c: (0,) * x.ndim)


def launch(q, k, v, o, lse, do, ft, fv, cfg: BackwardConfig, masks) -> BackwardOutput:
    """The backward of one call: ``q``, ``o``, ``do`` ``(B, T, N, H)``, ``k``, ``v`` ``(B, S, K, H)``,
    ``lse`` float32 ``(B, N, T)``; ``masks`` the forward's mask arrays (``pallas_kernel.Masks``:
    mask and bias broadcastable to ``(B, N, T, S)``). With ``cfg.partial`` the gradients are
    float32 and ``bwd_softmax``'s residual is the rows' signed Σ p over this call's keys."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    BM, BN, G = cfg.block_m, cfg.block_n, cfg.G
    Tp, Sp = -(-T // BM) * BM, -(-S // BN) * BN
    qp, op, dop = (pad_to(x, 1, Tp) for x in (q, o, do))
    kp, vp = pad_to(k, 1, Sp), pad_to(v, 1, Sp)
    lsep = pad_to(lse, 2, Tp)
    sums = side_sums(qp, kp, vp, op, dop, cfg)
    dense = [_dense(masks.mask, T, S, Tp, Sp, jnp.int8), _dense(masks.bias, T, S, Tp, Sp)]
    lengths = [None if x is None else x.astype(jnp.int32) for x in (masks.query_lengths, masks.key_lengths)]
    params = dict(compiler_params=compat.triton_params(cfg.num_warps, cfg.num_stages), interpret=cfg.interpret,
                  debug=cfg.debug)

    # ---- dK, dV: grid key blocks × B × N
    full_q = pl.BlockSpec((None, Tp, None, H), lambda j, b, n: (b, 0, n, 0))
    kv_blk = pl.BlockSpec((None, BN, None, H), lambda j, b, n: (b, j, n // G, 0))
    row_all = pl.BlockSpec((None, None, Tp), lambda j, b, n: (b, n, 0))
    args = [qp, kp, vp, dop, lsep, sums.dd]
    specs = [full_q, kv_blk, kv_blk, full_q, row_all, row_all]
    if cfg.checks:
        args += [sums.rb, sums.wq, sums.vmax, sums.totdo]
        specs += [pl.BlockSpec((None, None, *sums.rb.shape[2:]), lambda j, b, n: (b, n, 0, 0, 0)),
                  pl.BlockSpec((None, None, Tp, W), lambda j, b, n: (b, n, 0, 0)), _whole(sums.vmax),
                  _whole(sums.totdo)]
    for x in dense:
        if x is not None:
            bb, nb = x.shape[0] > 1, x.shape[1] > 1
            args.append(x)
            specs.append(pl.BlockSpec((None, None, Tp, BN),
                                      lambda j, b, n, bb=bb, nb=nb: (b if bb else 0, n if nb else 0, 0, j)))
    extra = [x for x in lengths if x is not None] + ([ft, fv] if cfg.n_faults else [])
    args += extra
    specs += [_whole(x) for x in extra]
    part = jax.ShapeDtypeStruct((B, Sp, N, H), F32)
    part_spec = pl.BlockSpec((None, BN, None, H), lambda j, b, n: (b, j, n, 0))
    key_stat = jax.ShapeDtypeStruct((B, N, Sp), F32)
    key_spec = pl.BlockSpec((None, None, BN), lambda j, b, n: (b, n, j))
    n_key = 2 * len(KEY_CHECKS) + 1 if cfg.checks else 0
    res = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg, H=H), grid=(Sp // BN, B, N), in_specs=specs,
        out_specs=[part_spec, part_spec] + [key_spec] * n_key, out_shape=[part, part] + [key_stat] * n_key,
        name="ftattn_fused_backward_dkdv", **params)(*args)
    dk_part, dv_part, key_out = res[0], res[1], res[2:]

    # ---- dQ: grid query blocks × B × N
    q_blk = pl.BlockSpec((None, BM, None, H), lambda i, b, n: (b, i, n, 0))
    kv_all = pl.BlockSpec((None, Sp, None, H), lambda i, b, n: (b, 0, n // G, 0))
    row_blk = pl.BlockSpec((None, None, BM), lambda i, b, n: (b, n, i))
    args = [qp, kp, vp, dop, op, lsep, sums.dd]
    specs = [q_blk, kv_all, kv_all, q_blk, q_blk, row_blk, row_blk]
    if cfg.checks:
        args += [sums.kb, sums.wk]
        specs += [pl.BlockSpec((None, None, *sums.kb.shape[2:]), lambda i, b, n: (b, n // G, 0, 0, 0)),
                  pl.BlockSpec((None, None, Sp, W), lambda i, b, n: (b, n // G, 0, 0))]
    for x in dense:
        if x is not None:
            bb, nb = x.shape[0] > 1, x.shape[1] > 1
            args.append(x)
            specs.append(pl.BlockSpec((None, None, BM, Sp),
                                      lambda i, b, n, bb=bb, nb=nb: (b if bb else 0, n if nb else 0, i, 0)))
    args += extra
    specs += [_whole(x) for x in extra]
    out_shape = [jax.ShapeDtypeStruct((B, Tp, N, H), F32 if cfg.partial else q.dtype)]
    out_specs = [q_blk]
    if cfg.has_bias:
        out_shape.append(jax.ShapeDtypeStruct((B, N, Tp, Sp), F32))
        out_specs.append(pl.BlockSpec((None, None, BM, Sp), lambda i, b, n: (b, n, i, 0)))
    n_row = 2 * len(ROW_CHECKS) if cfg.checks else 0
    out_shape += [jax.ShapeDtypeStruct((B, N, Tp), F32)] * n_row
    out_specs += [row_blk] * n_row
    res = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, H=H), grid=(Tp // BM, B, N), in_specs=specs, out_specs=out_specs,
        out_shape=out_shape, name="ftattn_fused_backward_dq", **params)(*args)
    dq = res[0][:, :T]
    ds = res[1][:, :, :T, :S] if cfg.has_bias else None
    row_out = res[2:] if cfg.has_bias else res[1:]

    dk = dk_part[:, :S].reshape(B, S, K, G, H).sum(3).astype(F32 if cfg.partial else k.dtype)
    dv = dv_part[:, :S].reshape(B, S, K, G, H).sum(3).astype(F32 if cfg.partial else v.dtype)
    if not cfg.checks:
        return BackwardOutput(dq, dk, dv, ds, None, None, None)
    rows = tuple(x[..., :T] for x in row_out)
    keys = tuple(x[..., :S] for x in key_out[:-1])
    cols = key_out[-1][..., :S]
    return BackwardOutput(dq, dk, dv, ds, rows, keys, cols)
