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
multiple of ``block_m`` and S to a multiple of ``block_n`` and passes the true
lengths; the kernel masks keys at or beyond S.

Masks (``ftattn_spec.masking``): each program visits only the tiles of keys
its live rows may attend (the band of the window, ``is_causal`` and the key
length); the tiles every live row attends in full run without an element
mask, the others mask per element and are skipped when nothing in them is
attended (a dense mask is read tile by tile). The ``qk_row`` prediction adds
the pre-pass sums of the full tiles and, for a partial tile, a 0/1 matrix of
the attended entries times K.

Inputs besides q, k, v, per (batch, kv head), computed by the caller in XLA:
  * ``kpre`` float32 ``(B, K, C, 2, H)``: ``kpre[b, kh, c] = (Σ k_j, Σ |k_j|)``
    over the keys of tile ``c`` (``C = ceil(S / block_n)``);
  * ``vcol`` ``(B, K, S, 16)`` in the input dtype: ``v̄_j = Σ_h v_jh`` and
    ``w_j = Σ_h |v_jh|``, each split into three parts (hi + mid + lo), then zeros;
  * the mask forms given: an int8 mask and a bias ``(B|1, N|1, Tp, Sp)``, int32
    ``(B,)`` lengths, and under ``uniform`` the mean value row ``(B, K, H)``;
  * with faults: ``ft`` int32 ``(F·8,)`` rows (site, replica, b, n, i, j, kind,
    bit) and ``fv`` float32 ``(F,)`` values, read at run time.

Outputs: ``o`` ``(B, T, N, H)``, ``qfin`` float32 ``(B, N, T)`` (1 where the
query row is finite), with ``Config.lse`` each row's base-2 log-sum-exp (float32
``(B, N, T)``), and per check two float32 ``(B, N, T)`` arrays: the
signed difference (``qk_row``, ``pv_row``; the residual for ``softmax_dmr``; for
``softmax_exp`` the worst tile's ratio to its bound, :mod:`.exp_tiles`) and the threshold.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array

from ftattn_spec import exp_checksum
from ftattn_spec import faults as spec_faults
from ftattn_spec import masking
from ftattn_spec import tolerances as tol
from ftattn_spec.tolerances import FusedCoefficients

from . import compat
from .exp_tiles import rescale_ratio, row_residual, tile_ratio
from .kernel_faults import corrupt
from .side_inputs import ONES_COL, VCOLS, KernelOutput, pad_to, side_inputs, stat_planes
from .tiles import _band, _ends

LOG2E = math.log2(math.e)
F32 = jnp.float32
# ftattn_spec.faults.SITES indices of the sites the kernel injects itself
SITE_SCORES, SITE_PROBS, SITE_OUT, SITE_RESCALE, SITE_ROWSUM = (
    spec_faults.SITES.index(x) for x in ("scores", "probs", "out", "rescale", "rowsum"))
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
    #: the mask forms (``ftattn_spec.masking``): query ``i`` attends keys
    #: ``i - left <= j <= i + right`` (``is_causal`` and the window combined; None: unbounded),
    #: and which arrays come in: a dense bool mask, a bias, query and key lengths
    window: tuple[int, int] | None = None
    has_mask: bool = False
    has_bias: bool = False
    has_qlen: bool = False
    has_klen: bool = False
    #: a row with nothing attended gets the mean of every value row (jax.nn's rule), not zero
    uniform: bool = False
    #: also write each row's base-2 log-sum-exp (for the fused backward, :mod:`.pallas_backward`)
    lse: bool = False
    exp: bool = False  # the exponential checksum softmax_exp (:mod:`.exp_tiles`)

    @property
    def vcol(self) -> bool:
        """Whether the kernel reads ``vcol`` and runs its narrow MMA: ``pv_row``'s columns, and the column
        of ones whose product ``P̂·1`` softmax_exp compares with l."""
        return self.pv or self.exp

    @property
    def band(self) -> tuple[int, int]:
        """``(left, right)`` of ``ftattn_spec.masking.band``."""
        return masking.band(self.window, self.causal)


def _inject(x, rows, cols, ft_ref, fv_ref, cfg, b, n, site: int, replica: int, unit):
    """Apply the plan's faults at (b, n, row, col) of ``site``/``replica`` that fall in this tile
    (``cfg``: any kernel's config with ``n_faults``, the backward's too)."""
    for f in range(cfg.n_faults):
        fb, fn, fi, fj = (ft_ref[8 * f + x] for x in (2, 3, 4, 5))  # -1: every position (stuck-at)
        here = ((ft_ref[8 * f] == site) & (ft_ref[8 * f + 1] == replica)
                & ((fb == -1) | (fb == b)) & ((fn == -1) | (fn == n)))
        hit = here & ((fi == -1) | (rows[:, None] == fi)) & ((fj == -1) | (cols[None, :] == fj))
        x = jnp.where(hit, corrupt(x, ft_ref[8 * f + 6], ft_ref[8 * f + 7], fv_ref[f], unit), x)
    return x


def _inject_rows(x, rows, cols, ft_ref, fv_ref, cfg, b, n, site: int):
    """A per-row value of the tile whose keys are ``cols`` (the rescale factor), with the faults of
    ``site`` at (b, n, row, any key of the tile) applied (as Triton's ``_inject_rows``)."""
    x2 = _inject(jnp.broadcast_to(x[:, None], (x.shape[0], cols.shape[0])), rows, cols, ft_ref, fv_ref, cfg, b, n,
                 site, 0, 1.0)
    hit = (x2 != x[:, None]) | (x2 != x2)
    return jnp.where(jnp.max(hit.astype(F32), axis=1) > 0, jnp.sum(jnp.where(hit, x2, 0.0), axis=1), x)


def _planned(ft_ref, cfg: Config, b, n, r_lo, r_hi, c_lo, c_hi):
    """Whether the plan puts a fault into the probabilities of this tile: a tile the masks would
    skip is then computed, as the unfused path computes every entry of P."""
    hit = jnp.zeros((), bool)
    for f in range(cfg.n_faults):
        fb, fn, fi, fj = (ft_ref[8 * f + x] for x in (2, 3, 4, 5))
        hit = hit | ((ft_ref[8 * f] == SITE_PROBS) & ((fb == -1) | (fb == b)) & ((fn == -1) | (fn == n))
                     & ((fi == -1) | ((fi >= r_lo) & (fi <= r_hi))) & ((fj == -1) | ((fj >= c_lo) & (fj <= c_hi))))
    return hit


def cz_of(cfg: Config) -> float:
    """The factor ``c_z`` that turns the kernel's logits z into base-2 units: ``scale·log2 e`` on
    raw scores, ``log2 e`` with a bias (z is then ``scale·s + bias``)."""
    return LOG2E if cfg.has_bias else cfg.scale * LOG2E


def _kernel(*refs, cfg: Config, H: int):
    it = iter(refs)
    q_ref, k_ref, v_ref = next(it), next(it), next(it)
    kpre_ref = next(it) if cfg.qk else None
    vcol_ref = next(it) if cfg.vcol else None
    mask_ref = next(it) if cfg.has_mask else None
    bias_ref = next(it) if cfg.has_bias else None
    qlen_ref = next(it) if cfg.has_qlen else None
    klen_ref = next(it) if cfg.has_klen else None
    vmean_ref = next(it) if cfg.uniform else None
    ft_ref, fv_ref = (next(it), next(it)) if cfg.n_faults else (None, None)
    o_ref, qfin_ref = next(it), next(it)
    lse_ref = next(it) if cfg.lse else None
    stat_refs = list(it)

    BM, BN = cfg.block_m, cfg.block_n
    mb, b, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    c = cfg.scale * LOG2E
    rows = mb * BM + lax.broadcasted_iota(jnp.int32, (BM,), 0)
    q = q_ref[...]
    dt = q.dtype
    qf = q.astype(F32)
    qfin_ref[...] = jnp.min(jnp.where(jnp.abs(qf) < jnp.inf, F32(1.0), F32(0.0)), axis=1)

    # ---- the band of keys any live row of this block attends (docs/kernels.md, "Masks")
    left, right = cfg.band
    qend, kend = _ends(cfg, qlen_ref, klen_ref, b)
    live = rows < qend
    n_live = jnp.sum(live.astype(jnp.int32))
    r_lo = mb * BM
    r_hi = jnp.minimum(r_lo + BM, qend) - 1
    lo, hi = _band(r_lo, r_hi, kend, left, right)
    t_start, t_end = lo // BN, (hi + BN - 1) // BN
    f0 = jnp.maximum(t_start, (jnp.maximum(r_hi - left, 0) + BN - 1) // BN)
    f1 = jnp.minimum(jnp.minimum(t_end, jnp.maximum(r_lo + right + 1, 0) // BN), kend // BN)
    if cfg.has_mask:  # a dense mask: every tile is looked at (and skipped when nothing in it is attended)
        f0 = f1 = t_start
    if cfg.n_faults:  # a planned fault in a masked probability: every tile is looked at (_planned)
        t_start, t_end = jnp.int32(0), jnp.int32((cfg.S + BN - 1) // BN)
    f0 = jnp.minimum(f0, t_end)
    f1 = jnp.maximum(f1, f0)

    def keep_of(start):
        cols = start + lax.broadcasted_iota(jnp.int32, (BN,), 0)
        keep = ((cols[None, :] < kend) & (cols[None, :] >= rows[:, None] - left)
                & (cols[None, :] <= rows[:, None] + right) & live[:, None])
        if cfg.has_mask:
            keep = keep & (mask_ref[:, pl.ds(start, BN)] != 0)
        return keep

    def tile(start, carry, keep, partial):
        """One tile of keys; ``keep`` None: every entry counts (but rows beyond the query length)."""
        acc, m_raw, l, srow, l2, d, pv, nc, mmax, pred, mag, kacc, kabs, seen, ex = carry
        k = k_ref[pl.ds(start, BN), :]
        v = v_ref[pl.ds(start, BN), :]
        cols = start + lax.broadcasted_iota(jnp.int32, (BN,), 0)
        s = compat.dot(q, k, trans_b=True)  # float32 BM × BN
        if cfg.n_faults:
            s = _inject(s, rows, cols, ft_ref, fv_ref, cfg, b, n, SITE_SCORES, 0, cfg.scale)
        # the softmax's logits z, weighted by exp2(z·cz): raw q·k, or scale·q·k + bias
        if cfg.has_bias:
            z, cz = s * cfg.scale + bias_ref[:, pl.ds(start, BN)].astype(F32), LOG2E
        else:
            z, cz = s, c
        counted = keep if keep is not None else (live[:, None] if cfg.has_qlen else None)
        if counted is not None:
            z = jnp.where(counted, z, -jnp.inf)
        m_new = jnp.maximum(m_raw, jnp.max(z, axis=1))
        m_use = jnp.where(m_new > -jnp.inf, m_new, 0.0)  # nothing attended yet: exp2 sees -inf, not NaN
        m_sc = m_use * cz
        # (z − m)·cz is exactly 0 at the row maximum and never positive, so the sum
        # is at least 1 and nothing overflows at any finite logit. The fused
        # multiply-add z·cz − m·cz (one operation instead of two) is off by up to half
        # an ulp of |m·cz| there: from |m·cz| = 2³⁰ on it overflows exp2 or flushes a
        # row to 0. Measured cost and a rejected per-tile switch: docs/kernels.md, M8.
        p = jnp.exp2((z - m_use[:, None]) * cz)
        # the rescale factor; 1 while the row has attended nothing (then only a fault put anything in l)
        alpha = jnp.where(m_new > -jnp.inf, jnp.exp2((m_raw - m_use) * cz), 1.0)
        if cfg.n_faults:
            p = _inject(p, rows, cols, ft_ref, fv_ref, cfg, b, n, SITE_PROBS, 0, 1.0)
            alpha = _inject_rows(alpha, rows, cols, ft_ref, fv_ref, cfg, b, n, SITE_RESCALE)
        if cfg.exp:  # softmax_exp: Σ log₂ p against the argument by its own formula, at this tile's max,
            # and the rescale factor evaluated twice
            ex = jnp.maximum(ex, tile_ratio(z, p, cz, m_sc, BN, cfg.S))
            ex = jnp.maximum(ex, rescale_ratio(alpha, m_raw, m_new, m_sc, cz))
        lt = jnp.sum(p, axis=1)
        if cfg.n_faults:
            lt = _inject_rows(lt, rows, cols, ft_ref, fv_ref, cfg, b, n, SITE_ROWSUM)
        l = l * alpha + lt
        pm = p.astype(dt)
        acc = acc * alpha[:, None] + compat.dot(pm, v)
        if cfg.qk:
            srow = srow + jnp.sum(s if counted is None else jnp.where(counted, s, 0.0), axis=1)
            t = start // BN

            def by_product(pm_):
                # the attended keys of each row: a 0/1 matrix times K (and |K|)
                pred_, mag_, kacc_, kabs_ = pm_
                w = keep.astype(dt)
                return (pred_ + jnp.sum(qf * compat.dot(w, k), axis=1),
                        mag_ + jnp.sum(jnp.abs(qf) * compat.dot(w, jnp.abs(k)), axis=1), kacc_, kabs_)

            def by_sums(pm_):
                pred_, mag_, kacc_, kabs_ = pm_
                return pred_, mag_, kacc_ + kpre_ref[t, 0, :], kabs_ + kpre_ref[t, 1, :]

            if keep is None:
                pred, mag, kacc, kabs = by_sums((pred, mag, kacc, kabs))
            else:
                pred, mag, kacc, kabs = lax.cond(partial, by_product, by_sums, (pred, mag, kacc, kabs))
        if cfg.dmr:
            # the replica: its own argument formula (clamped at 0, see above) and
            # its own rescale factor
            p2 = jnp.exp2(jnp.minimum(z * cz - m_sc[:, None], 0.0))
            if cfg.n_faults:
                p2 = _inject(p2, rows, cols, ft_ref, fv_ref, cfg, b, n, SITE_PROBS, 1, 1.0)
            # exactly 1 where the maximum did not rise (a contracted m·cz − m_sc would leave u·μ at
            # every tile; docs/kernels.md, "softmax_dmr at large logits")
            alpha2 = jnp.where(m_new > m_raw, jnp.exp2(jnp.minimum(m_raw * cz - m_sc, 0.0)), 1.0)
            l2t = jnp.sum(p2, axis=1)
            l2 = l2 * alpha2 + l2t
            d = d * alpha + jnp.abs(lt - l2t)
        if cfg.dmr or cfg.vcol:
            nc = nc + ((m_new > m_raw) & (m_raw > -jnp.inf)).astype(jnp.int32)
            mmax = jnp.maximum(mmax, jnp.abs(m_sc))
        if cfg.vcol:
            vc = vcol_ref[pl.ds(start, BN), :]
            pv = pv * alpha[:, None] + compat.dot(pm, vc)
        if cfg.uniform:
            # (a max, not jnp.any: Pallas' Triton lowering has no reduce_or)
            seen = jnp.maximum(seen, jnp.max((live[:, None] if keep is None else keep).astype(jnp.int32), axis=1))
        return acc, m_new, l, srow, l2, d, pv, nc, mmax, pred, mag, kacc, kabs, seen, ex

    def masked_step(t, carry):
        start = pl.multiple_of(t * BN, BN)
        keep = keep_of(start)
        nk = jnp.sum(keep.astype(jnp.int32))
        go = nk > 0
        if cfg.n_faults:
            go = go | _planned(ft_ref, cfg, b, n, r_lo, r_lo + BM - 1, start, start + BN - 1)
        return lax.cond(go, lambda cr: tile(start, cr, keep, nk < n_live * BN), lambda cr: cr, carry)

    def full_step(t, carry):
        return tile(pl.multiple_of(t * BN, BN), carry, None, None)

    zeros = jnp.zeros((BM,), F32)
    carry = (jnp.zeros((BM, H), F32), jnp.full((BM,), -jnp.inf, F32), zeros, zeros, zeros, zeros,
             jnp.zeros((BM, VCOLS), F32), jnp.zeros((BM,), jnp.int32), zeros, zeros, zeros,
             jnp.zeros((H,), F32), jnp.zeros((H,), F32), jnp.zeros((BM,), jnp.int32), zeros)
    carry = lax.fori_loop(t_start, f0, masked_step, carry)
    carry = lax.fori_loop(f0, f1, full_step, carry)
    carry = lax.fori_loop(f1, t_end, masked_step, carry)
    acc, m_raw, l, srow, l2, d, pv, nc, mmax, pred, mag, kacc, kabs, seen, ex = carry

    # a row with nothing attended (rows beyond the query length included) has output zero,
    # or under ``uniform`` (but beyond the query length) the mean of every value row
    inv = jnp.where(l > 0.0, 1.0 / l, 0.0)
    o = acc * inv[:, None]
    filled = None
    if cfg.uniform:
        filled = live & (seen == 0)
        o = jnp.where(filled[:, None], vmean_ref[...][None, :], o)
    if cfg.n_faults:
        hs = lax.broadcasted_iota(jnp.int32, (H,), 0)
        o = _inject(o, rows, hs, ft_ref, fv_ref, cfg, b, n, SITE_OUT, 0, 1.0)
    o_ref[...] = o.astype(o_ref.dtype)
    if cfg.lse:  # p_ij = exp2(z_ij·c_z − LSE_i); +inf for a row that attends nothing
        lse_ref[...] = jnp.where(l > 0.0, jnp.where(m_raw > -jnp.inf, m_raw, 0.0) * cz_of(cfg) + jnp.log2(l),
                                 jnp.inf)

    co = cfg.coef  # tol.FusedCoefficients
    outs = iter(stat_refs)
    if cfg.qk:
        # ---- qk_row: Σ_j s_ij over the attended keys against q_i·(Σ over those keys of k)
        pred = pred + jnp.sum(qf * kacc[None, :], axis=1)
        mag = mag + jnp.sum(jnp.abs(qf) * kabs[None, :], axis=1)
        next(outs)[...] = jnp.where(live, (srow - pred) * cfg.scale, 0.0)
        next(outs)[...] = jnp.where(live, (co.qk * mag + co.qk_allow) * cfg.scale, 0.0)
    nc_f = nc.astype(F32)
    if cfg.dmr:
        # ---- softmax_dmr: replica sums, plus range checks (finite max and sums, l >= 1);
        # a row with nothing attended has l = l' = 0 and nothing to judge
        thr = co.dmr0 + co.dmr_rescale * nc_f + co.dmr_mu * mmax * (1.0 + nc_f) + co.dmr_allow * inv
        r = (d + jnp.abs(l - l2)) * inv
        ok = (m_raw < jnp.inf) & (l < jnp.inf) & (l2 < jnp.inf) & (l * (1.0 + thr) >= 1.0)
        r = jnp.where(ok, r, jnp.inf)
        next(outs)[...] = jnp.where((m_raw == -jnp.inf) & (l == 0.0) & (l2 == 0.0), 0.0, r)
        next(outs)[...] = thr
    if cfg.exp:  # ---- softmax_exp: the worst tile in units of its bound, and l against P̂·1; threshold 1
        sco = exp_checksum.sum_coefficients(cfg.S, jnp.dtype(dt).name, BN)
        ones = jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, (BM, VCOLS), 1) == ONES_COL, pv, 0.0), axis=1)
        ex = jnp.maximum(ex, jnp.abs(ones - l) / exp_checksum.sum_threshold(sco, l, nc_f, cfg.S))
        next(outs)[...] = row_residual(ex, l)
        next(outs)[...] = jnp.ones_like(l)
    if cfg.pv:
        # ---- pv_row: Σ_h o_ih against (P̂·v̄)_i / l_i (a filled row's mean is not a product: not judged)
        ccol = lax.broadcasted_iota(jnp.int32, (BM, VCOLS), 1)
        pvp = jnp.sum(jnp.where(ccol < 3, pv, 0.0), axis=1) * (inv * cfg.vcol_unscale)
        pvw = jnp.sum(jnp.where((ccol >= 3) & (ccol < 6), pv, 0.0), axis=1) * (inv * cfg.vcol_unscale)
        diff = jnp.sum(o, axis=1) - pvp
        next(outs)[...] = diff if filled is None else jnp.where(filled, 0.0, diff)
        next(outs)[...] = (co.pv + co.pv_rescale * nc_f) * pvw + co.pv_allow


class Masks(NamedTuple):
    """The mask arrays of one launch (None where not given): ``mask`` bool and ``bias``
    floating, broadcastable to ``(B, N, T, S)`` (rank 4, as ``ftattn_spec.masking`` pads
    them), int ``(B,)`` lengths. The window and ``is_causal`` are static (:class:`Config`)."""

    mask: Array | None = None
    bias: Array | None = None
    query_lengths: Array | None = None
    key_lengths: Array | None = None


def _dense_spec(x, BM: int):
    """A ``(B|1, N|1, Tp, Sp)`` array's row blocks for program ``(i, b, n)`` (broadcast axes read 0)."""
    bb, nb = x.shape[0] > 1, x.shape[1] > 1
    return pl.BlockSpec((None, None, BM, x.shape[3]), lambda i, b, n: (b if bb else 0, n if nb else 0, i, 0))


def forward(q, k, v, kpre, vcol, ft, fv, cfg: Config, masks: Masks = Masks(), vmean=None):
    """Launch the kernel on padded inputs; returns ``(o, qfin, stats)`` (see the module doc).

    ``q`` is ``(B, Tp, N, H)``, ``k``/``v`` ``(B, Sp, K, H)``, ``Tp`` and ``Sp``
    multiples of the block sizes, the dense masks ``(B|1, N|1, Tp, Sp)``; ``stats`` is a list
    of float32 ``(B, N, Tp)`` arrays, two per check that ``cfg`` turns on, in the order qk, dmr, exp, pv.
    """
    B, Tp, N, H = q.shape
    Sp = k.shape[1]
    G, BM = cfg.G, cfg.block_m
    grid = (Tp // BM, B, N)
    row_spec = pl.BlockSpec((None, BM, None, H), lambda i, b, n: (b, i, n, 0))
    kv_spec = pl.BlockSpec((None, Sp, None, H), lambda i, b, n: (b, 0, n // G, 0))
    stat_spec = pl.BlockSpec((None, None, BM), lambda i, b, n: (b, n, i))
    whole = lambda x: pl.BlockSpec(x.shape, lambda i, b, n: (0,) * x.ndim)  # noqa: E731
    args, in_specs = [q, k, v], [row_spec, kv_spec, kv_spec]
    if cfg.qk:
        args.append(kpre)
        in_specs.append(pl.BlockSpec((None, None, *kpre.shape[2:]), lambda i, b, n: (b, n // G, 0, 0, 0)))
    if cfg.vcol:
        args.append(vcol)
        in_specs.append(pl.BlockSpec((None, None, Sp, VCOLS), lambda i, b, n: (b, n // G, 0, 0)))
    for x in (masks.mask, masks.bias):
        if x is not None:
            args.append(x)
            in_specs.append(_dense_spec(x, BM))
    for x in (masks.query_lengths, masks.key_lengths):
        if x is not None:
            args.append(x)
            in_specs.append(whole(x))
    if cfg.uniform:
        args.append(vmean)
        in_specs.append(pl.BlockSpec((None, None, H), lambda i, b, n: (b, n // G, 0)))
    if cfg.n_faults:
        args += [ft, fv]
        in_specs += [whole(ft), whole(fv)]
    n_stats = stat_planes(cfg)
    stat_shape = jax.ShapeDtypeStruct((B, N, Tp), F32)
    n_stats += cfg.lse
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), stat_shape] + [stat_shape] * n_stats
    out_specs = [row_spec, stat_spec] + [stat_spec] * n_stats
    outs = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, H=H), grid=grid, in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, compiler_params=compat.triton_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret, debug=cfg.debug, name="ftattn_fused_forward")(*args)
    return outs[0], outs[1], list(outs[2:])


def config(q_shape, k_shape, dtype: str, *, scale, causal, which, n_faults, blocks: BlockSizes, interpret,
           debug=False, masking=None, uniform: bool = False) -> Config:
    """The static settings of a launch: ``which`` checks, ``n_faults`` slots of the fault table;
    ``masking`` a ``ftattn_spec.masking.Masking`` (None: no mask form but ``causal``);
    ``uniform`` fills a row with nothing attended with the mean of the values."""
    B, T, N, H = q_shape
    S, K = k_shape[1], k_shape[2]
    chunk = blocks.block_n  # the side inputs sum K over each tile of keys
    m = masking
    return Config(
        T=T, S=S, G=N // K, scale=float(scale), causal=causal, block_m=blocks.block_m, block_n=blocks.block_n,
        chunk=chunk, qk="qk_row" in which, dmr="softmax_dmr" in which, pv="pv_row" in which, n_faults=n_faults,
        coef=tol.fused_coefficients(S, H, dtype, blocks.block_m, blocks.block_n, chunk),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages, interpret=interpret, debug=debug,
        vcol_unscale=1.0 / tol.fused_vcol_scale(dtype, H),
        window=None if m is None else m.window, has_mask=m is not None and m.mask_shape is not None,
        has_bias=m is not None and m.bias_shape is not None, has_qlen=m is not None and m.query_lengths,
        has_klen=m is not None and m.key_lengths, uniform=bool(uniform), exp="softmax_exp" in which)


def _dense(x, T: int, S: int, Tp: int, Sp: int, dtype=None):
    """A rank <= 4 mask or bias as ``(B|1, N|1, Tp, Sp)``, zero-padded (padding is masked anyway)."""
    if x is None:
        return None
    x = x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))
    x = jnp.broadcast_to(x, (*x.shape[:2], T, S)).astype(dtype or x.dtype)
    return jnp.pad(x, ((0, 0), (0, 0), (0, Tp - T), (0, Sp - S)))


def launch(q, k, v, ft, fv, cfg: Config, masks: Masks = Masks()) -> KernelOutput:
    """Pad to whole blocks, compute the side inputs, run the kernel, cut the padding off."""
    T, S, BM, BN = cfg.T, cfg.S, cfg.block_m, cfg.block_n
    Tp = -(-T // BM) * BM
    Sp = -(-S // BN) * BN
    qp, kp, vp = pad_to(q, 1, Tp), pad_to(k, 1, Sp), pad_to(v, 1, Sp)
    kpre, vcol, kv_finite = side_inputs(kp, vp, S, cfg.chunk, cfg.qk, cfg.pv, 1.0 / cfg.vcol_unscale, prefix=False,
                                        ones=cfg.exp)
    padded = Masks(_dense(masks.mask, T, S, Tp, Sp, jnp.int8), _dense(masks.bias, T, S, Tp, Sp),
                   *(None if x is None else x.astype(jnp.int32) for x in (masks.query_lengths, masks.key_lengths)))
    vmean = None
    if cfg.uniform:  # B K H: the output of a row that attends nothing
        vmean = jnp.mean(v.astype(F32), axis=1)
    o, qfin, stats = forward(qp, kp, vp, kpre, vcol, ft, fv, cfg, padded, vmean)
    lse = stats.pop(0)[..., :T] if cfg.lse else None
    return KernelOutput(o[:, :T], qfin[..., :T], tuple(x[..., :T] for x in stats), kv_finite, lse)
