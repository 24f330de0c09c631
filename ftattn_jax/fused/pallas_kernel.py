"""The portable Pallas kernel of ``implementation="pallas"``: a fused, self-checking flash attention forward.

It follows the algebra of ``docs/kernels.md`` (the same as the Triton kernel
of ``ftattn_torch``) and lowers through Pallas' Triton backend on any CUDA GPU,
or runs in Pallas' interpret mode anywhere (CI runs it on the CPU). Nothing
here imports the reference, the unfused path or the Mosaic kernel; the
version differences of the Pallas API live in :mod:`.compat`. The module's
interface is that of every kernel of ``ftattn_jax.fused``: :class:`BlockSizes`
(validated on construction), :func:`unsupported`, :func:`config` and
:func:`launch` (returning a :class:`~.side_inputs.KernelOutput`).

Legend of ``ftattn_spec.axes``: q ``B T N H``, k and v ``B S K H``, query head
``n`` reads kv head ``n // G``. :func:`launch` pads T to a
multiple of ``block_m`` and S to a multiple of ``block_n`` (and, under a
causal mask, to at least the padded T) and passes the true lengths; the kernel
masks keys at or beyond S.

Inputs besides q, k, v, per (batch, kv head), computed by the caller in XLA:
  * ``kpre`` float32 ``(B, K, C + 1, 2, H)``: ``kpre[b, kh, c] = (Σ k_j, Σ |k_j|)``
    over the keys before ``c·chunk`` (exclusive prefix sums at chunk
    boundaries; ``C = ceil(S / chunk)``, so ``c = C`` is the total);
  * ``vcol`` ``(B, K, S, 16)`` in the input dtype: ``v̄_j = Σ_h v_jh`` and
    ``w_j = Σ_h |v_jh|``, each split into three parts (hi + mid + lo), then zeros;
  * with faults: ``ft`` int32 ``(F·8,)`` rows (site, replica, b, n, i, j, kind,
    bit) and ``fv`` float32 ``(F,)`` values, read at run time.

Outputs: ``o`` ``(B, T, N, H)``, ``qfin`` float32 ``(B, N, T)`` (1 where the
query row is finite), and per check two float32 ``(B, N, T)`` arrays: the
signed difference (``qk_row``, ``pv_row``; the residual for ``softmax_dmr``)
and the threshold.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ftattn_spec import tolerances as tol
from ftattn_spec.tolerances import FusedCoefficients

from . import compat
from .kernel_faults import corrupt
from .side_inputs import VCOLS, KernelOutput, pad_to, side_inputs

LOG2E = math.log2(math.e)
F32 = jnp.float32
# ftattn_spec.faults.SITES indices of the sites the kernel injects itself
SITE_SCORES, SITE_PROBS, SITE_OUT = 0, 1, 2
#: the lowering name of this kernel (``attention(..., lowering=...)``)
LOWERING = "triton"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile shape and launch settings of the portable kernel.

    ``block_m`` query rows per program, ``block_n`` keys per tile (powers of
    two, at least 16).
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    LOWERING: ClassVar[str] = LOWERING

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            x = getattr(self, name)
            if not isinstance(x, int) or x < 16 or x & (x - 1):
                raise ValueError(f"blocks.{name}: expected a power of two >= 16, got {x!r}")

    def validate(self) -> "BlockSizes":
        """Kept for callers of earlier versions: construction validates."""
        return self

    @classmethod
    def get_default(cls, interpret: bool, head_dim: int = 128, checks: bool = True) -> "BlockSizes":
        """Interpret mode: small tiles (fast on small tests, and several tiles per row).
        GPU: measured on an H100 (docs/kernels.md)."""
        if interpret:
            return cls(16, 16, 1, 1)
        return cls(128, 64, 8, 3) if checks else cls(128, 64, 4, 2)


#: the block-size type of this kernel, under the name every kernel module uses
Blocks = BlockSizes


def unsupported(query, *, platform: str, interpret: bool, plan=None) -> str | None:
    """Why this kernel cannot run the call here, or None (the catalogue has judged the arguments).

    It runs on every GPU Pallas' Triton lowering supports, and interpreted anywhere.
    """
    if not interpret and platform != "gpu":
        return f"it compiles for a GPU, but the query is on {platform!r}"
    return None


@dataclasses.dataclass(frozen=True)
class Config:
    """Static settings of one compilation (everything that is not data)."""

    LOWERING: ClassVar[str] = LOWERING

    T: int  # true query length
    S: int  # true key length
    G: int  # query heads per kv head
    scale: float
    causal: bool
    block_m: int
    block_n: int
    chunk: int
    qk: bool
    dmr: bool
    pv: bool
    n_faults: int  # 0: the injection code is not compiled in
    coef: FusedCoefficients
    num_warps: int
    num_stages: int
    interpret: bool
    vcol_unscale: float = 1.0  # 1 / tol.fused_vcol_scale: undoes the scaling of vcol (a power of two)
    debug: bool = False  # Pallas prints the kernel's jaxpr and Triton IR when it lowers it


def _inject(x, rows, cols, ft_ref, fv_ref, cfg: Config, b, n, site: int, replica: int, unit):
    """Apply the plan's faults at (b, n, row, col) of ``site``/``replica`` that fall in this tile."""
    for f in range(cfg.n_faults):
        here = ((ft_ref[8 * f] == site) & (ft_ref[8 * f + 1] == replica)
                & (ft_ref[8 * f + 2] == b) & (ft_ref[8 * f + 3] == n))
        hit = here & (rows[:, None] == ft_ref[8 * f + 4]) & (cols[None, :] == ft_ref[8 * f + 5])
        x = jnp.where(hit, corrupt(x, ft_ref[8 * f + 6], ft_ref[8 * f + 7], fv_ref[f], unit), x)
    return x


def _kernel(*refs, cfg: Config, H: int):
    it = iter(refs)
    q_ref, k_ref, v_ref = next(it), next(it), next(it)
    kpre_ref = next(it) if cfg.qk else None
    vcol_ref = next(it) if cfg.pv else None
    ft_ref, fv_ref = (next(it), next(it)) if cfg.n_faults else (None, None)
    o_ref, qfin_ref = next(it), next(it)
    stat_refs = list(it)

    BM, BN = cfg.block_m, cfg.block_n
    mb, b, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    c = cfg.scale * LOG2E
    rows = mb * BM + lax.broadcasted_iota(jnp.int32, (BM,), 0)
    q = q_ref[...]
    dt = q.dtype
    qf = q.astype(F32)
    qfin_ref[...] = jnp.min(jnp.where(jnp.abs(qf) < jnp.inf, F32(1.0), F32(0.0)), axis=1)

    def tile(start_tile, carry, masked: bool):
        acc, m_raw, l, srow, l2, d, pv, nc, mmax = carry
        start = pl.multiple_of(start_tile * BN, BN)
        k = k_ref[pl.ds(start, BN), :]
        v = v_ref[pl.ds(start, BN), :]
        cols = start + lax.broadcasted_iota(jnp.int32, (BN,), 0)
        s = compat.dot(q, k, trans_b=True)  # float32 BM × BN
        if cfg.n_faults:
            s = _inject(s, rows, cols, ft_ref, fv_ref, cfg, b, n, SITE_SCORES, 0, cfg.scale)
        keep = None
        if masked:
            keep = cols[None, :] < cfg.S
            if cfg.causal:
                keep = keep & (cols[None, :] <= rows[:, None])
            s = jnp.where(keep, s, -jnp.inf)
        m_new = jnp.maximum(m_raw, jnp.max(s, axis=1))
        m_sc = m_new * c
        # (s − m)·c is exactly 0 at the row maximum and never positive, so the sum
        # is at least 1 and nothing overflows at any finite logit. The fused
        # multiply-add s·c − m·c (one operation instead of two) is off by up to half
        # an ulp of |m·c| there: from |m·c| = 2³⁰ on it overflows exp2 or flushes a
        # row to 0. Measured cost and a rejected per-tile switch: docs/kernels.md, M8.
        p = jnp.exp2((s - m_new[:, None]) * c)
        alpha = jnp.exp2((m_raw - m_new) * c)
        if cfg.n_faults:
            p = _inject(p, rows, cols, ft_ref, fv_ref, cfg, b, n, SITE_PROBS, 0, 1.0)
        lt = jnp.sum(p, axis=1)
        l = l * alpha + lt
        pm = p.astype(dt)
        acc = acc * alpha[:, None] + compat.dot(pm, v)
        if cfg.qk:
            srow = srow + jnp.sum(s if keep is None else jnp.where(keep, s, 0.0), axis=1)
        if cfg.dmr:
            # the replica: its own argument formula (clamped at 0, see above) and
            # its own rescale factor
            p2 = jnp.exp2(jnp.minimum(s * c - m_sc[:, None], 0.0))
            if cfg.n_faults:
                p2 = _inject(p2, rows, cols, ft_ref, fv_ref, cfg, b, n, SITE_PROBS, 1, 1.0)
            alpha2 = jnp.exp2(jnp.minimum(m_raw * c - m_sc, 0.0))
            l2t = jnp.sum(p2, axis=1)
            l2 = l2 * alpha2 + l2t
            d = d * alpha + jnp.abs(lt - l2t)
        if cfg.dmr or cfg.pv:
            nc = nc + ((m_new > m_raw) & (m_raw > -jnp.inf)).astype(jnp.int32)
            mmax = jnp.maximum(mmax, jnp.abs(m_sc))
        if cfg.pv:
            vc = vcol_ref[pl.ds(start, BN), :]
            pv = pv * alpha[:, None] + compat.dot(pm, vc)
        return acc, m_new, l, srow, l2, d, pv, nc, mmax

    zeros = jnp.zeros((BM,), F32)
    carry = (jnp.zeros((BM, H), F32), jnp.full((BM,), -jnp.inf, F32), zeros, zeros, zeros, zeros,
             jnp.zeros((BM, VCOLS), F32), jnp.zeros((BM,), jnp.int32), zeros)
    if cfg.causal:
        hi = jnp.minimum(cfg.S, (mb + 1) * BM)
        edge = jnp.minimum(cfg.S, mb * BM)
    else:
        hi, edge = cfg.S, cfg.S
    n_full = edge // BN  # tiles before this one need no mask
    n_all = (hi + BN - 1) // BN
    carry = lax.fori_loop(0, n_full, functools.partial(tile, masked=False), carry)
    carry = lax.fori_loop(n_full, n_all, functools.partial(tile, masked=True), carry)
    acc, m_raw, l, srow, l2, d, pv, nc, mmax = carry

    inv = 1.0 / l
    o = acc * inv[:, None]
    if cfg.n_faults:
        hs = lax.broadcasted_iota(jnp.int32, (H,), 0)
        o = _inject(o, rows, hs, ft_ref, fv_ref, cfg, b, n, SITE_OUT, 0, 1.0)
    o_ref[...] = o.astype(o_ref.dtype)

    co = cfg.coef  # tol.FusedCoefficients
    outs = iter(stat_refs)
    if cfg.qk:
        # ---- qk_row: Σ_j s_ij against q_i·(Σ over attended keys of k)
        chunk = jnp.minimum((mb * BM) // cfg.chunk, (cfg.S + cfg.chunk - 1) // cfg.chunk) if cfg.causal \
            else (cfg.S + cfg.chunk - 1) // cfg.chunk
        ksum = kpre_ref[chunk, 0, :]
        kabs = kpre_ref[chunk, 1, :]
        pred = jnp.sum(qf * ksum[None, :], axis=1)
        mag = jnp.sum(jnp.abs(qf) * kabs[None, :], axis=1)
        if cfg.causal:
            # keys of the diagonal block up to each row: a 0/1 triangle times K
            d0 = pl.multiple_of(mb * BM, BM)
            kd = k_ref[pl.ds(d0, BM), :]
            dcols = d0 + lax.broadcasted_iota(jnp.int32, (BM,), 0)
            tri = ((dcols[None, :] <= rows[:, None]) & (dcols[None, :] < cfg.S)).astype(dt)
            pred = pred + jnp.sum(qf * compat.dot(tri, kd), axis=1)
            mag = mag + jnp.sum(jnp.abs(qf) * compat.dot(tri, jnp.abs(kd)), axis=1)
        next(outs)[...] = (srow - pred) * cfg.scale
        next(outs)[...] = (co.qk * mag + co.qk_allow) * cfg.scale
    nc_f = nc.astype(F32)
    if cfg.dmr:
        # ---- softmax_dmr: replica sums, plus range checks (finite max and sums, l >= 1)
        thr = co.dmr0 + co.dmr_rescale * nc_f + co.dmr_mu * mmax * (1.0 + nc_f) + co.dmr_allow * inv
        r = (d + jnp.abs(l - l2)) * inv
        ok = (m_raw > -jnp.inf) & (m_raw < jnp.inf) & (l < jnp.inf) & (l2 < jnp.inf) & (l * (1.0 + thr) >= 1.0)
        next(outs)[...] = jnp.where(ok, r, jnp.inf)
        next(outs)[...] = thr
    if cfg.pv:
        # ---- pv_row: Σ_h o_ih against (P̂·v̄)_i / l_i
        ccol = lax.broadcasted_iota(jnp.int32, (BM, VCOLS), 1)
        pvp = jnp.sum(jnp.where(ccol < 3, pv, 0.0), axis=1) * (inv * cfg.vcol_unscale)
        pvw = jnp.sum(jnp.where((ccol >= 3) & (ccol < 6), pv, 0.0), axis=1) * (inv * cfg.vcol_unscale)
        next(outs)[...] = jnp.sum(o, axis=1) - pvp
        next(outs)[...] = (co.pv + co.pv_rescale * nc_f) * pvw + co.pv_allow


def forward(q, k, v, kpre, vcol, ft, fv, cfg: Config):
    """Launch the kernel on padded inputs; returns ``(o, qfin, stats)`` (see the module doc).

    ``q`` is ``(B, Tp, N, H)``, ``k``/``v`` ``(B, Sp, K, H)``, ``Tp`` and ``Sp``
    multiples of the block sizes; ``stats`` is a list of float32 ``(B, N, Tp)``
    arrays, two per check that ``cfg`` turns on, in the order qk, dmr, pv.
    """
    B, Tp, N, H = q.shape
    Sp = k.shape[1]
    G, BM = cfg.G, cfg.block_m
    grid = (Tp // BM, B, N)
    row_spec = pl.BlockSpec((None, BM, None, H), lambda i, b, n: (b, i, n, 0))
    kv_spec = pl.BlockSpec((None, Sp, None, H), lambda i, b, n: (b, 0, n // G, 0))
    stat_spec = pl.BlockSpec((None, None, BM), lambda i, b, n: (b, n, i))
    args, in_specs = [q, k, v], [row_spec, kv_spec, kv_spec]
    if cfg.qk:
        args.append(kpre)
        in_specs.append(pl.BlockSpec((None, None, *kpre.shape[2:]), lambda i, b, n: (b, n // G, 0, 0, 0)))
    if cfg.pv:
        args.append(vcol)
        in_specs.append(pl.BlockSpec((None, None, Sp, VCOLS), lambda i, b, n: (b, n // G, 0, 0)))
    if cfg.n_faults:
        args += [ft, fv]
        in_specs += [pl.BlockSpec(ft.shape, lambda i, b, n: (0,)), pl.BlockSpec(fv.shape, lambda i, b, n: (0,))]
    n_stats = 2 * (cfg.qk + cfg.dmr + cfg.pv)
    stat_shape = jax.ShapeDtypeStruct((B, N, Tp), F32)
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), stat_shape] + [stat_shape] * n_stats
    out_specs = [row_spec, stat_spec] + [stat_spec] * n_stats
    outs = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, H=H), grid=grid, in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, compiler_params=compat.triton_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret, debug=cfg.debug, name="ftattn_fused_forward")(*args)
    return outs[0], outs[1], list(outs[2:])


def config(q_shape, k_shape, dtype: str, *, scale, causal, which, n_faults, blocks: BlockSizes, interpret,
           debug=False) -> Config:
    """The static settings of a launch: ``which`` checks, ``n_faults`` slots of the fault table."""
    B, T, N, H = q_shape
    S, K = k_shape[1], k_shape[2]
    chunk = tol.FUSED_CHUNK if blocks.block_m % tol.FUSED_CHUNK == 0 else blocks.block_m
    return Config(
        T=T, S=S, G=N // K, scale=float(scale), causal=causal, block_m=blocks.block_m, block_n=blocks.block_n,
        chunk=chunk, qk="qk_row" in which, dmr="softmax_dmr" in which, pv="pv_row" in which, n_faults=n_faults,
        coef=tol.fused_coefficients(S, H, dtype, blocks.block_m, blocks.block_n, chunk),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages, interpret=interpret, debug=debug,
        vcol_unscale=1.0 / tol.fused_vcol_scale(dtype, H))


def launch(q, k, v, ft, fv, cfg: Config) -> KernelOutput:
    """Pad to whole blocks, compute the side inputs, run the kernel, cut the padding off."""
    T, S, BM, BN = cfg.T, cfg.S, cfg.block_m, cfg.block_n
    Tp = -(-T // BM) * BM
    Sp = -(-S // BN) * BN
    if cfg.causal and cfg.qk:
        Sp = max(Sp, Tp)  # the diagonal block of the qk_row prediction reads keys up to Tp
    qp, kp, vp = pad_to(q, 1, Tp), pad_to(k, 1, Sp), pad_to(v, 1, Sp)
    kpre, vcol, kv_finite = side_inputs(kp, vp, S, cfg.chunk, cfg.qk, cfg.pv, 1.0 / cfg.vcol_unscale)
    o, qfin, stats = forward(qp, kp, vp, kpre, vcol, ft, fv, cfg)
    return KernelOutput(o[:, :T], qfin[..., :T], tuple(x[..., :T] for x in stats), kv_finite)
