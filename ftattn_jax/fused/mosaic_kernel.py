"""The Hopper kernel of ``implementation="pallas"``: the fused, self-checking forward on Mosaic GPU.

The same algebra as :mod:`.pallas_kernel` (``docs/kernels.md``), laid out the
way a Hopper GPU wants it: a warp-specialized program per 128 query rows with
two compute warpgroups (64 rows each) and one memory warpgroup. The memory
warpgroup streams K, V (and the ``pv_row`` columns) through a ring of shared
memory slots with the bulk tensor copy engine (TMA); the compute warpgroups
issue asynchronous warpgroup MMAs (``wgmma``) and take turns on the tensor
cores (a "schedule barrier" between them), so that the softmax and the checks
of one warpgroup run while the other's MMAs do. It needs sm_90 and does not
run in interpret mode; nothing here imports the portable kernel or the
reference.

Legend of ``ftattn_spec.axes``: q ``B T N H``, k and v ``B S K H``, query head
``n`` reads kv head ``n // G``. :func:`launch` pads T to a
multiple of 128 and S to a multiple of ``block_kv`` and passes the true
lengths; keys at or beyond S are masked in the last tile.

Inputs besides q, k, v (the portable kernel's, computed by the caller in XLA):
  * ``kpre`` float32 ``(B, K, C + 1, 2, H)``: exclusive prefix sums of
    ``(k, |k|)`` at multiples of ``CHUNK`` = 64 keys (``C = ceil(S / 64)``;
    entry ``C`` is the total);
  * ``vcol`` ``(B, K, S, 16)`` in the input dtype: ``v̄`` and ``Σ_h |v|``, each
    split in three parts, then zeros.

Per check, as in the portable kernel:
  * ``qk_row``: ``Σ_j s_ij`` (kept per row while the loop runs) against
    ``q_i · k̄_i``. Without a causal mask ``k̄`` is the total; with one it is
    the prefix at the warpgroup's first row ``r0`` (a multiple of 64) plus the
    keys in ``[r0, i]``. That last part is not a sum of K here: the diagonal
    tile's scores are computed a second time by a separate MMA and summed under
    the triangle (redundancy of those at most 64 scores per row instead of a
    checksum), so no 64×H triangle product has to stay live in registers.
    The magnitude uses ``Σ|k|`` up to ``r0 + 64`` (a bound).
  * ``softmax_dmr``: the replica ``p' = exp2(s·c − (m·c + 1))`` (a different
    argument, its own rescale factor; ``2·Σp'`` estimates ``Σp``), its own
    running sum ``l'``, and ``d ← α·d + |Σp − 2Σp'|``; range checks at the end.
  * ``pv_row``: a narrow MMA ``p̂ · vcol`` (BN × 16) into a 64 × 16 accumulator
    rescaled like the output's.
  * ``softmax_exp`` (jax >= 0.11: it bitcasts registers): per row and tile,
    ``Σ log₂ p`` from the exponent fields and the mantissas' products against the
    argument formed again, and the rescale factor evaluated twice
    (:func:`.exp_tiles.hopper_tile_ratio`); the worst tile's ratio, threshold 1.

Outputs: ``o`` ``(B, T, N, H)`` and float32 ``stats`` ``(n_stats, B, N, T)``:
first the 0/1 "query row finite" when ``qk_row`` runs (from ``Σ|q|·Σ|k|``),
then per check, in the order qk_row, softmax_dmr, softmax_exp, pv_row, the signed
difference (the residual for ``softmax_dmr``, the ratio for ``softmax_exp``) and the threshold.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
import numpy as np

from ftattn_spec import exp_checksum
from ftattn_spec import faults as spec_faults
from ftattn_spec import tolerances as tol
from ftattn_spec.tolerances import FusedCoefficients

from . import compat
from .exp_tiles import HOPPER_LOGS, hopper_tile_ratio, rescale_ratio
from .kernel_faults import (FAULT_FIELDS, FAULT_SLOTS, SLOT_OUT, SLOT_PROBS, SLOT_REPLICA, SLOT_SCORES, corrupt,
                            fault_rows)
from .side_inputs import ONES_COL, VCOLS, KernelOutput, pad_to, side_inputs

F32 = jnp.float32
LOG2E = math.log2(math.e)
CHUNK = 64  # prefix-sum granularity of kpre (= rows per compute warpgroup)
BLOCK_Q = 64  # rows per compute warpgroup (the wgmma M)
COMPUTE_WGS = 2


#: the lowering name of this kernel (``attention(..., lowering=...)``)
LOWERING = "mosaic_gpu"
HEAD_DIMS = (64, 128)


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
    """Settings of the Hopper kernel: ``block_kv`` keys per tile (64 or 128) and
    ``stages`` shared-memory slots in the K/V ring (query rows are fixed: two
    warpgroups of 64)."""

    block_kv: int = 128
    stages: int = 2
    late_checks: bool = False  # the checks that feed nothing run while the P·V MMA does
    ping_pong: bool = True  # the compute warpgroups take turns on the tensor cores
    overlap: bool = False  # a warpgroup's softmax runs beside its own previous tile's P·V (FlashAttention-3)
    fma_cols: int = 0  # columns of a tile whose replica exponentials run on the FMA pipe (a multiple of 8)
    exp_logs: str = HOPPER_LOGS[0]  # how softmax_exp takes Σ log₂ p (exp_tiles.hopper_log2_sum)
    LOWERING: ClassVar[str] = LOWERING

    def __post_init__(self):
        if self.block_kv not in (64, 128):
            raise ValueError(f"blocks.block_kv: expected 64 or 128, got {self.block_kv!r}")
        if not isinstance(self.fma_cols, int) or self.fma_cols % 8 or not 0 <= self.fma_cols <= self.block_kv:
            raise ValueError(f"blocks.fma_cols: expected a multiple of 8 in [0, block_kv], got {self.fma_cols!r}")
        if self.exp_logs not in HOPPER_LOGS:
            raise ValueError(f"blocks.exp_logs: expected one of {HOPPER_LOGS}, got {self.exp_logs!r}")
        if not isinstance(self.stages, int) or not 2 <= self.stages <= 4:
            raise ValueError(f"blocks.stages: expected an int in [2, 4], got {self.stages!r}")
        if self.overlap and self.late_checks:
            raise ValueError("blocks.overlap: expected False with late_checks=True (both move the checks), got True")

    def validate(self) -> "MosaicBlocks":
        """Kept for callers of earlier versions: construction validates."""
        return self

    @classmethod
    def get_default(cls, interpret: bool = False, head_dim: int = 128, checks: bool = True) -> "MosaicBlocks":
        """The H200 sweeps' best (docs/kernels.md, M2–M6) for every head dim, checks on or off."""
        return cls()


#: the block-size type of this kernel, under the name every kernel module uses
Blocks = MosaicBlocks


def can_inject() -> bool:
    """Whether this kernel can inject faults itself (its bit flips need Mosaic GPU's
    bitcast of registers, jax >= 0.11)."""
    return compat.JAX_VERSION >= (0, 11, 0)


def _slot_conflict(plan) -> bool:
    """True when two of the plan's in-kernel faults share a (site, replica, batch, head, row), or
    when the plan is traced (its rows cannot be compared here)."""
    try:
        idx = np.asarray(plan.index)
    except Exception:  # traced: a fault plan passed through jax.jit
        return True
    keys = [(int(s), int(r), *map(int, i[:3])) for s, r, i in zip(np.asarray(plan.site), np.asarray(plan.replica), idx)
            if int(s) in (0, 1, 2)]
    return len(keys) != len(set(keys))


def _lacks(checks) -> str | None:
    """Why this kernel cannot run one of ``checks`` with this JAX, or None: ``softmax_exp`` reads the
    exponent fields of the probabilities, which needs Mosaic GPU's bitcast of registers (jax >= 0.11)."""
    if "softmax_exp" in checks and not can_inject():
        return (f"the Hopper kernel's softmax_exp needs jax >= 0.11 (Mosaic GPU's bitcast of registers), "
                f"this is jax {jax.__version__}; the portable kernel runs it")
    return None


def unsupported(query, *, platform: str, interpret: bool | None, plan=None, checks=()) -> str | None:
    """Why this kernel cannot run the call here (``checks``: those the call runs), or None."""
    H = query.shape[-1]
    if why := _lacks(checks):
        return why
    if platform != "gpu" or not available():
        return f"the query is on {platform!r}, not an sm_90 (Hopper) GPU with Mosaic GPU available"
    if interpret:
        return "interpret=True (the Hopper kernel cannot run in interpret mode)"
    if H not in HEAD_DIMS:
        return f"head dim H={H} (the Hopper kernel takes H in {HEAD_DIMS})"
    if plan is not None and not can_inject():
        return (f"a fault plan was given and jax {jax.__version__} cannot inject faults in the Hopper kernel "
                f"(needs 0.11)")
    if plan is not None and _slot_conflict(plan):
        return "the fault plan puts two faults on one query row of one site (the Hopper kernel takes one per row)"
    if plan is not None and (np.asarray(plan.kind) >= 3).any():
        return "the fault plan has a stuck-at fault, which the Hopper kernel does not inject (one element per row)"
    for site in spec_faults.FUSED_FORWARD_SITES:
        if plan is not None and spec_faults.SITES.index(site) in np.asarray(plan.site).tolist():
            return f"the fault plan has a fault at site {site!r}, which the Hopper kernel does not inject"
    return None


@dataclasses.dataclass(frozen=True)
class Config:
    """Static settings of one compilation."""

    LOWERING: ClassVar[str] = LOWERING

    T: int
    S: int
    G: int
    scale: float
    causal: bool
    block_kv: int
    stages: int
    qk: bool
    dmr: bool
    pv: bool
    coef: FusedCoefficients
    exp: bool = False  # softmax_exp (:func:`.exp_tiles.hopper_tile_ratio`) and the rescale factor twice
    exp_logs: str = HOPPER_LOGS[0]  # how softmax_exp takes Σ log₂ p (exp_tiles.hopper_log2_sum)
    inject: bool = False  # compile the fault injection in (a per-row fault table is an input)
    late_checks: bool = False  # qk_row's sum and the replica after the P·V MMA is issued (beside it)
    ping_pong: bool = True  # the two compute warpgroups take turns on the tensor cores (a schedule barrier)
    overlap: bool = False  # tile i+1's scores and softmax beside tile i's P·V within a warpgroup
    vcol_unscale: float = 1.0  # 1 / tol.fused_vcol_scale: undoes the scaling of vcol (a power of two)
    fma_cols: int = 0  # the replica's exponentials of the first fma_cols columns of a tile on the FMA pipe

    @property
    def vcol(self) -> bool:
        """Whether the kernel streams ``vcol`` and runs the narrow MMA: ``pv_row``'s columns, and the
        column of ones whose ``P̂·1`` softmax_exp compares with l."""
        return self.pv or self.exp

    @property
    def n_stats(self) -> int:
        return (1 if self.qk else 0) + 2 * (self.qk + self.dmr + self.exp + self.pv)


#: 2^f ≈ 1 + f·(c1 + f·(c2 + f·(c3 + f·(c4 + f·c5)))) on |f| <= 1/2: relative error 1.9e-7 in float32
#: (about 3 units of 2^-24, inside the 16 units the tolerance model allows an exponential; fitted here
#: by iteratively reweighted least squares toward the minimax polynomial)
EXP2_POLY = (0.6931470036506653, 0.24022242426872253, 0.05550733581185341, 0.009671512991189957,
             0.001326472731307149)
_ROUND_MAGIC = 12582912.0  # 1.5·2^23: x + this holds round(x) in its low mantissa bits


def _exp2_fma(x):
    """2^x for x <= 0 on the FMA pipe (no MUFU): round(x) into the exponent bits, a polynomial
    for the rest. Arguments below -125 give 2^-125·(…) instead of 0 (the primary flushes those)."""
    x = jnp.maximum(x, -125.0)
    t = lax.optimization_barrier(x + _ROUND_MAGIC)
    f = x - (t - _ROUND_MAGIC)  # in [-1/2, 1/2]
    poly = EXP2_POLY[-1]
    for coef in EXP2_POLY[-2::-1]:
        poly = poly * f + coef
    poly = poly * f + 1.0
    scale = lax.bitcast_convert_type(jnp.left_shift(lax.bitcast_convert_type(t, jnp.int32), 23)
                                     + jnp.int32(127 << 23), F32)
    return poly * scale


def available() -> bool:
    """True where this JAX has Mosaic GPU and the default device is a Hopper GPU (sm_90)."""
    if compat.mosaic_gpu() is None:
        return False
    try:
        dev = jax.devices()[0]
    except RuntimeError:  # pragma: no cover
        return False
    if dev.platform != "gpu":
        return False
    cc = getattr(dev, "compute_capability", "")
    return str(cc).split(".")[0] == "9"


def forward(q, k, v, kpre, vcol, cfg: Config, frows=None):
    """Launch on padded inputs: ``q`` ``(B, Tp, N, H)``, Tp a multiple of 128;
    ``k``/``v`` ``(B, Sp, K, H)``, Sp a multiple of ``block_kv``; with
    ``cfg.inject``, ``frows`` float32 ``(16, B, N, Tp)``: per slot (scores,
    probs, probs replica, out) and query row the fault's column (−1: none),
    kind, bit and value (:func:`fault_rows`).
    Returns ``(o, stats)`` (see the module doc)."""
    plgpu = compat.mosaic_gpu()
    B, Tp, N, H = q.shape
    dtype = q.dtype
    BQ, BN, G = BLOCK_Q, cfg.block_kv, cfg.G
    S = cfg.S
    stages = max(1, min(cfg.stages, -(-S // BN)))
    c = cfg.scale * LOG2E
    n_stats = cfg.n_stats
    C = -(-S // CHUNK)
    WGMMA = plgpu.Layout.WGMMA
    ROW = plgpu.Layout.WGMMA.reduce(1)
    COL = plgpu.Layout.WGMMA.reduce(0)

    def row_full(value):
        return plgpu.layout_cast(jnp.full((BQ,), value, dtype=F32), ROW)

    def bcast_rows(x, shape):  # a per-row vector across a tile's columns
        return lax.broadcast_in_dim(x, shape, [0])

    def kernel(q_ref, k_ref, v_ref, kpre_ref, vcol_ref, fr_ref, o_ref, stats_ref, scoped):
        (qo_smem2, k_smem, v_smem, vc_smem, ks_smem2, st_smem2, fr_smem2), bars, consumed, schedule = scoped
        k_bars, v_bars, vc_bars, q_bars, ks_bars, fr_bars = bars
        k_done, v_done = consumed
        batch = lax.axis_index("batch")
        head = lax.axis_index("heads")
        cta = lax.axis_index("q_seq")
        wg = lax.axis_index("wg")
        kv_head = lax.div(head, jnp.array(G, head.dtype))

        def schedule_arrive():
            if cfg.ping_pong:
                plgpu.barrier_arrive(schedule)

        def schedule_wait():
            if cfg.ping_pong:
                plgpu.barrier_wait(schedule)

        def schedule_barrier():
            schedule_arrive()
            schedule_wait()

        cta_base = cta * (COMPUTE_WGS * BQ)
        if cfg.causal:
            cta_steps = pl.cdiv(jnp.minimum(cta_base + COMPUTE_WGS * BQ, S), jnp.array(BN, jnp.int32))
        else:
            cta_steps = -(-S // BN)

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            qo_smem = qo_smem2.at[wg]
            st_smem = st_smem2.at[wg] if n_stats else None
            r0 = cta_base + wg * BQ
            if cfg.causal:
                full_steps = lax.div(jnp.minimum(r0, S), jnp.array(BN, jnp.int32))
                steps = pl.cdiv(jnp.minimum(r0 + BQ, S), jnp.array(BN, jnp.int32))
            else:
                full_steps, steps = S // BN, -(-S // BN)

            plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(r0, BQ), head], qo_smem, q_bars.at[wg])
            if cfg.qk:
                # the prefix sums at r0 and r0 + 64 (kpre carries its total twice at the end)
                chunk = jnp.minimum(lax.div(r0, jnp.array(CHUNK, jnp.int32)), C) if cfg.causal else C
                plgpu.copy_gmem_to_smem(kpre_ref.at[batch, kv_head, pl.ds(chunk, 2)], ks_smem2.at[wg], ks_bars.at[wg])
            if cfg.inject:
                plgpu.copy_gmem_to_smem(fr_ref.at[:, batch, head, pl.ds(r0, BQ)], fr_smem2.at[wg], fr_bars.at[wg])
                plgpu.barrier_wait(fr_bars.at[wg])
            plgpu.barrier_wait(q_bars.at[wg])

            def inject(x, slot: int, cols, unit: float):
                """The faults of this slot's table that fall in the tile ``x`` (columns ``cols``)."""
                field = [compat.mgpu_load(fr_smem2.at[wg, FAULT_FIELDS * slot + f], ROW) for f in range(FAULT_FIELDS)]
                col, kind, bit, value = (bcast_rows(f, x.shape) for f in field)
                hit = cols == col.astype(jnp.int32)
                return jnp.where(hit, corrupt(x, kind.astype(jnp.int32), bit.astype(jnp.int32), value, unit), x)

            zero = row_full(0.0)
            carry = dict(acc=plgpu.layout_cast(jnp.zeros((BQ, H), F32), WGMMA), m=row_full(-jnp.inf), l=zero)
            if cfg.qk:
                carry["srow"] = zero
                if cfg.causal:
                    carry["sdiag"] = zero
            if cfg.dmr:
                carry.update(l2=zero, d=zero)
            if cfg.dmr or cfg.vcol:
                carry.update(nc=zero, mmax=zero)
            if cfg.vcol:
                carry["pv"] = plgpu.layout_cast(jnp.zeros((BQ, VCOLS), F32), WGMMA)
            if cfg.exp:
                carry["ex"] = zero  # the worst tile's softmax_exp ratio (threshold 1)

            check_keys = [n for n, on in (("srow", cfg.qk), ("l2", cfg.dmr), ("d", cfg.dmr), ("ex", cfg.exp)) if on]

            @pl.when(steps > 0)
            def _():
                plgpu.barrier_wait(k_bars.at[0])

            pl.when(wg == 1)(schedule_barrier)

            def again(acc_ref, slot):  # the diagonal tile's scores a second time (qk_row under a causal mask)
                plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                return acc_ref[...]

            def scores(slot, diag: bool):
                """A tile's scores (and, with ``diag``, their second copy), taking a turn on the
                tensor cores; the K slot is released. Returns ``(s, s2 or None)``."""
                s2 = pl.run_scoped(lambda r: again(r, slot), plgpu.ACC((BQ, BN), F32)) if diag else None

                def qk_mma(acc_ref):
                    plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                    schedule_barrier()
                    return acc_ref[...]

                s = pl.run_scoped(qk_mma, plgpu.ACC((BQ, BN), F32))
                plgpu.barrier_arrive(k_done.at[slot])
                return s, s2

            def wait_values(slot):  # the V tile (and its narrow columns) of ``slot`` have landed
                plgpu.barrier_wait(v_bars.at[slot])
                if cfg.vcol:
                    plgpu.barrier_wait(vc_bars.at[slot])

            def pv_issue(acc_ref, pv_ref, p16, slot):  # P̂·V, and P̂·vcol beside it
                plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                if cfg.vcol:
                    plgpu.wgmma(pv_ref, p16, vc_smem.at[slot])

            def softmax(i, s, carry, masked: bool, s2=None):
                """Tile ``i``'s softmax and the checks that live in it, on its scores ``s`` (and, on
                the diagonal with qk_row, ``s2``: the same scores from a separate MMA); returns the
                updated ``carry`` (all but ``acc`` and ``pv``), P̂, the rescale factor, and the checks
                that feed nothing as a function of their running values (``tile_checks``)."""
                carry = dict(carry)
                cols = None
                if masked or cfg.inject:
                    rows = r0 + plgpu.broadcasted_iota(jnp.int32, (BQ, BN), 0, layout=WGMMA)
                    cols = i * BN + plgpu.broadcasted_iota(jnp.int32, (BQ, BN), 1, layout=WGMMA)
                if s2 is not None:  # summed under the triangle [r0, i]
                    tri = (cols >= r0) & (cols <= rows) & (cols < S)
                    carry["sdiag"] = carry["sdiag"] + jnp.sum(jnp.where(tri, s2, 0.0), axis=1)
                if cfg.inject:
                    s = inject(s, SLOT_SCORES, cols, cfg.scale)
                keep = None
                if masked:
                    keep = cols < S
                    if cfg.causal:
                        keep = keep & (cols <= rows)
                    s = jnp.where(keep, s, -jnp.inf)
                m_old = carry["m"]
                m_new = jnp.maximum(m_old, s.max(axis=1))  # the running maximum of the raw scores
                m_sc = m_new * c  # in exp2 units
                alpha = jnp.exp2((m_old - m_new) * c)
                # (s − m)·c is exactly 0 at the row maximum and never positive: the sum is at
                # least 1 and nothing overflows at any finite logit (s·c − m·c, contracted into
                # a fused multiply-add, exceeds 0 by up to half an ulp of |s·c|: inf above 2³¹)
                p = jnp.exp2((s - bcast_rows(m_new, s.shape)) * c)
                if cfg.inject:
                    p = inject(p, SLOT_PROBS, cols, 1.0)
                lt = p.sum(axis=1)
                carry["l"] = carry["l"] * alpha + lt
                if cfg.dmr or cfg.vcol:
                    carry["nc"] = carry["nc"] + jnp.where((m_new > m_old) & (m_old > -jnp.inf), 1.0, 0.0)
                    carry["mmax"] = jnp.maximum(carry["mmax"], jnp.abs(m_sc))
                carry["m"] = m_new

                def tile_checks(state):
                    """The checks that feed nothing of the output (qk_row's sum, the softmax replica):
                    ``state`` maps ``check_keys`` to their running values; returns them updated."""
                    state = dict(state)
                    if cfg.qk:
                        state["srow"] = state["srow"] + jnp.sum(s if keep is None else jnp.where(keep, s, 0.0), axis=1)
                    if cfg.dmr:
                        # its own formula, clamped at 0 (see the primary's comment)
                        arg = jnp.minimum(s * c - bcast_rows(m_sc + 1.0, s.shape), 0.0)
                        F = min(cfg.fma_cols, BN)

                        def part(lo, hi, fn):
                            whole = lo == 0 and hi == BN
                            return (fn(arg if whole else arg[:, lo:hi]),
                                    cols if whole or cols is None else cols[:, lo:hi])

                        parts = [part(F, BN, jnp.exp2)] if F < BN else []
                        if F:  # these on the FMA pipe, beside the MUFU's exponentials
                            parts.append(part(0, F, _exp2_fma))
                        l2t = 0.0
                        for p2, pcols in parts:
                            if cfg.inject:  # the replica's logical value is 2·p'
                                p2 = inject(p2, SLOT_REPLICA, pcols, 2.0)
                            l2t = l2t + p2.sum(axis=1)
                        l2t = l2t * 2.0
                        # exactly 1 where the maximum did not rise (docs/kernels.md, "softmax_dmr
                        # at large logits": the rounding of m_sc + 1 would otherwise stay at every tile)
                        alpha2 = jnp.where(m_new > m_old, jnp.exp2(jnp.minimum(m_old * c - (m_sc + 1.0), 0.0)) * 2.0,
                                           1.0)
                        state["l2"] = state["l2"] * alpha2 + l2t
                        state["d"] = state["d"] * alpha + jnp.abs(lt - l2t)
                    if cfg.exp:
                        # Σ log₂ p against the argument by its own formula, and the rescale factor again
                        ratio = hopper_tile_ratio(s, p, c, m_sc, BN, S, keep=keep, logs=cfg.exp_logs,
                                                  rows=lambda x: bcast_rows(x, s.shape))
                        ratio = jnp.maximum(ratio, rescale_ratio(alpha, m_old, m_new, m_sc, c))
                        state["ex"] = jnp.maximum(state["ex"], ratio)
                    return state

                if not cfg.late_checks:
                    carry.update(tile_checks({n: carry[n] for n in check_keys}))
                return carry, p.astype(dtype), alpha, tile_checks

            def step(i, carry, masked: bool):
                slot = lax.rem(i, jnp.array(stages, i.dtype))
                s, s2 = scores(slot, masked and cfg.causal and cfg.qk)
                carry, p16, alpha, tile_checks = softmax(i, s, carry, masked, s2)
                acc = carry["acc"] * bcast_rows(alpha, (BQ, H))
                pv = carry["pv"] * bcast_rows(alpha, (BQ, VCOLS)) if cfg.vcol else None
                acc, pv, p16 = lax.optimization_barrier((acc, pv, p16))

                schedule_arrive()  # softmax done
                wait_values(slot)
                schedule_wait()  # the tensor cores are ours

                late = check_keys if cfg.late_checks else []

                def pv_mma(refs):
                    acc_ref, pv_ref, check_refs = refs
                    pv_issue(acc_ref, pv_ref, p16, slot)
                    if late:  # on the CUDA cores while the tensor cores run P·V
                        new = tile_checks({n: r[...] for n, r in zip(late, check_refs)})
                        for n, r in zip(late, check_refs):
                            r[...] = new[n]
                    nxt = i + 1

                    @pl.when(nxt < steps)
                    def _():
                        plgpu.barrier_wait(k_bars.at[lax.rem(nxt, jnp.array(stages, i.dtype))])

                init = (plgpu.ACC.init(acc), plgpu.ACC.init(pv) if cfg.vcol else None, [carry[n] for n in late])
                acc, pv, vals = pl.run_state(pv_mma)(init)
                if cfg.vcol:
                    carry["pv"] = pv
                carry.update(zip(late, vals))
                plgpu.barrier_arrive(v_done.at[slot])
                carry["acc"] = acc
                return carry

            def overlapped(i, carry, masked: bool):
                """FlashAttention-3's order within a warpgroup: issue tile i+1's scores and tile
                i's P·V together, then run tile i+1's softmax (and its checks) while P·V runs."""
                carry = dict(carry)
                acc, pv, p16 = carry.pop("acc"), carry.pop("pv", None), carry.pop("p16")
                slot, nslot = (lax.rem(x, jnp.array(stages, i.dtype)) for x in (i, i + 1))
                plgpu.barrier_wait(k_bars.at[nslot])
                wait_values(slot)
                schedule_wait()  # the tensor cores are ours
                diag = masked and cfg.causal and cfg.qk

                def mmas(refs):
                    acc_ref, pv_ref, out = refs

                    def scored(s_refs):
                        s_ref, s2_ref = s_refs
                        plgpu.wgmma(s_ref, qo_smem, k_smem.at[nslot].transpose((1, 0)))
                        if diag:
                            plgpu.wgmma(s2_ref, qo_smem, k_smem.at[nslot].transpose((1, 0)))
                        pv_issue(acc_ref, pv_ref, p16, slot)
                        schedule_barrier()
                        behind = 2 if cfg.vcol else 1  # P·V may still run
                        got = plgpu.wgmma_accumulator_load(s_ref, wait_n=behind)
                        got2 = plgpu.wgmma_accumulator_load(s2_ref, wait_n=behind) if diag else None
                        plgpu.barrier_arrive(k_done.at[nslot])
                        new, p16n, alpha, _ = softmax(i + 1, got, {n: r[...] for n, r in out[0].items()}, masked,
                                                      got2)
                        for n, r in out[0].items():
                            r[...] = new[n]
                        out[1][...] = p16n
                        out[2][...] = alpha

                    pl.run_scoped(scored, (plgpu.ACC((BQ, BN), F32), plgpu.ACC((BQ, BN), F32) if diag else None))

                init = (plgpu.ACC.init(acc), plgpu.ACC.init(pv) if cfg.vcol else None, (carry, p16, carry["m"]))
                acc, pv, (carry, p16, alpha) = pl.run_state(mmas)(init)
                plgpu.barrier_arrive(v_done.at[slot])
                carry["acc"] = acc * bcast_rows(alpha, (BQ, H))
                if cfg.vcol:
                    carry["pv"] = pv * bcast_rows(alpha, (BQ, VCOLS))
                carry["p16"] = p16
                schedule_arrive()  # softmax done
                return carry

            if cfg.overlap:  # tile 0's scores and softmax; the loop; the last tile's P·V
                first_masked = cfg.causal or S < BN  # tile 0 may be the diagonal or a partial tile
                s, s2 = scores(0, first_masked and cfg.causal and cfg.qk)
                acc, pv = carry.pop("acc"), carry.pop("pv", None)
                carry, p16, _, _ = softmax(jnp.int32(0), s, carry, first_masked, s2)
                carry.update(acc=acc, p16=p16, **({"pv": pv} if cfg.vcol else {}))
                schedule_arrive()
                last = jnp.maximum(full_steps - 1, 0)
                carry = lax.fori_loop(0, last, lambda i, cr: overlapped(i, cr, False), carry)
                if cfg.causal or S % BN:
                    carry = lax.fori_loop(last, steps - 1, lambda i, cr: overlapped(i, cr, True), carry)
                p16 = carry.pop("p16")
                slot = lax.rem(steps - 1, jnp.array(stages, jnp.int32))
                wait_values(slot)
                schedule_wait()
                acc, pv = pl.run_state(lambda refs: pv_issue(*refs, p16, slot))((plgpu.ACC.init(carry["acc"]),
                                                 plgpu.ACC.init(carry["pv"]) if cfg.vcol else None))
                plgpu.barrier_arrive(v_done.at[slot])
                carry["acc"] = acc
                if cfg.vcol:
                    carry["pv"] = pv
            else:
                carry = lax.fori_loop(0, full_steps, lambda i, cr: step(i, cr, False), carry)
                if cfg.causal or S % BN:
                    carry = lax.fori_loop(full_steps, steps, lambda i, cr: step(i, cr, True), carry)
            if cfg.causal:
                def drain(i, _):  # the other warpgroup's remaining steps: release the slots, keep the turns
                    slot = lax.rem(i, jnp.array(stages, i.dtype))
                    plgpu.barrier_arrive(k_done.at[slot])
                    plgpu.barrier_arrive(v_done.at[slot])
                    schedule_barrier()
                    schedule_barrier()

                lax.fori_loop(steps, cta_steps, drain, None)
            pl.when(wg == 0)(schedule_barrier)

            acc, m, l = carry["acc"], carry["m"], carry["l"]
            inv = 1.0 / l
            o = acc * bcast_rows(inv, (BQ, H))
            if cfg.inject:
                o = inject(o, SLOT_OUT, plgpu.broadcasted_iota(jnp.int32, (BQ, H), 1, layout=WGMMA), 1.0)
            stats = []
            if cfg.qk:
                plgpu.barrier_wait(ks_bars.at[wg])
                qf = compat.mgpu_load(qo_smem, WGMMA).astype(F32)
                ksum = compat.mgpu_load(ks_smem2.at[wg, 0, 0], COL)
                kabs = compat.mgpu_load(ks_smem2.at[wg, 1 if cfg.causal else 0, 1], COL)
                pred = jnp.sum(qf * lax.broadcast_in_dim(ksum, (BQ, H), [1]), axis=1)
                mag = jnp.sum(jnp.abs(qf) * lax.broadcast_in_dim(kabs, (BQ, H), [1]), axis=1)
                if cfg.causal:
                    pred = pred + carry["sdiag"]
                stats.append(jnp.where(jnp.abs(mag) < jnp.inf, 1.0, 0.0))
            qo_smem[...] = o.astype(dtype)
            co = cfg.coef  # tol.FusedCoefficients
            if cfg.qk:
                stats += [(carry["srow"] - pred) * cfg.scale, (co.qk * mag + co.qk_allow) * cfg.scale]
            if cfg.dmr:
                nc = carry["nc"]
                thr = co.dmr0 + co.dmr_rescale * nc + co.dmr_mu * carry["mmax"] * (1.0 + nc) + co.dmr_allow * inv
                l2 = carry["l2"]
                r = (carry["d"] + jnp.abs(l - l2)) * inv
                ok = (m > -jnp.inf) & (m < jnp.inf) & (l < jnp.inf) & (l2 < jnp.inf) & (l * (1.0 + thr) >= 1.0)
                stats += [jnp.where(ok, r, jnp.inf), thr]
            if cfg.exp:  # the worst tile in units of its bound, and l against P̂·1; +inf where l is not finite
                ccol = plgpu.broadcasted_iota(jnp.int32, (BQ, VCOLS), 1, layout=WGMMA)
                ones = jnp.sum(jnp.where(ccol == ONES_COL, carry["pv"], 0.0), axis=1)
                sco = exp_checksum.sum_coefficients(S, jnp.dtype(dtype).name, BN)
                ex = jnp.maximum(carry["ex"], jnp.abs(ones - l) / exp_checksum.sum_threshold(sco, l, carry["nc"], S))
                stats += [jnp.where(jnp.abs(l) < jnp.inf, ex, jnp.inf), row_full(1.0)]
            if cfg.pv:
                pvacc = carry["pv"]
                ccol = plgpu.broadcasted_iota(jnp.int32, (BQ, VCOLS), 1, layout=WGMMA)
                pvp = jnp.sum(jnp.where(ccol < 3, pvacc, 0.0), axis=1) * (inv * cfg.vcol_unscale)
                pvw = jnp.sum(jnp.where((ccol >= 3) & (ccol < 6), pvacc, 0.0), axis=1) * (inv * cfg.vcol_unscale)
                stats += [jnp.sum(o, axis=1) - pvp, (co.pv + co.pv_rescale * carry["nc"]) * pvw + co.pv_allow]
            for j, x in enumerate(stats):
                st_smem.at[j][...] = x
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[batch, pl.ds(r0, BQ), head])
            for j in range(len(stats)):
                plgpu.copy_smem_to_gmem(st_smem.at[j], stats_ref.at[j, batch, head, pl.ds(r0, BQ)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WGS)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def load(i, slot):
                rows = (batch, pl.ds(i * BN, BN), kv_head)
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_bars.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_bars.at[slot])
                if cfg.vcol:
                    plgpu.copy_gmem_to_smem(vcol_ref.at[batch, kv_head, pl.ds(i * BN, BN)], vc_smem.at[slot],
                                            vc_bars.at[slot])

            for i in range(stages):
                pl.when(i < cta_steps)(lambda i=i: load(i, i))

            @pl.loop(0, jnp.maximum(cta_steps - stages, 0))
            def _(i):
                slot = lax.rem(i, jnp.array(stages, i.dtype))
                plgpu.barrier_wait(k_done.at[slot])
                plgpu.barrier_wait(v_done.at[slot])
                load(i + stages, slot)

    def entry(q_ref, k_ref, v_ref, kpre_ref, vcol_ref, fr_ref, o_ref, stats_ref):
        swz = 128
        tiled = (plgpu.TilingTransform((8, swz // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swz))
        vc_t = (plgpu.TilingTransform((8, VCOLS)), plgpu.SwizzleTransform(VCOLS * jnp.dtype(dtype).itemsize))
        smem = (
            plgpu.SMEM((COMPUTE_WGS, BQ, H), dtype, transforms=tiled),
            plgpu.SMEM((stages, BN, H), dtype, transforms=tiled),
            plgpu.SMEM((stages, BN, H), dtype, transforms=tiled),
            plgpu.SMEM((stages, BN, VCOLS), dtype, transforms=vc_t) if cfg.vcol else None,
            plgpu.SMEM((COMPUTE_WGS, 2, 2, H), F32) if cfg.qk else None,
            plgpu.SMEM((COMPUTE_WGS, max(n_stats, 1), BQ), F32) if n_stats else None,
            plgpu.SMEM((COMPUTE_WGS, FAULT_SLOTS * FAULT_FIELDS, BQ), F32) if cfg.inject else None,
        )
        bars = (
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages) if cfg.vcol else None,
            plgpu.Barrier(num_barriers=COMPUTE_WGS),
            plgpu.Barrier(num_barriers=COMPUTE_WGS) if cfg.qk else None,
            plgpu.Barrier(num_barriers=COMPUTE_WGS) if cfg.inject else None,
        )
        consumed = (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),) * 2
        pl.run_scoped(
            lambda *args: kernel(q_ref, k_ref, v_ref, kpre_ref, vcol_ref, fr_ref, o_ref, stats_ref, args),
            smem, bars, consumed, plgpu.Barrier(num_arrivals=COMPUTE_WGS), collective_axes="wg")

    if kpre is None:
        kpre = jnp.zeros((B, 1, 2, 2, H), F32)
    else:
        kpre = jnp.concatenate([kpre, kpre[:, :, -1:]], axis=2)  # C + 2 entries: pl.ds(chunk, 2) stays inside
    if vcol is None:
        vcol = jnp.zeros((B, 1, BN, VCOLS), dtype)

    if frows is None:
        frows = jnp.zeros((FAULT_SLOTS * FAULT_FIELDS, 1, 1, 2 * BQ), F32)
    out_type = [jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((max(n_stats, 1), B, N, Tp), F32)]
    o, stats = plgpu.kernel(
        entry, out_type=out_type, grid=(N, Tp // (COMPUTE_WGS * BQ), B), grid_names=("heads", "q_seq", "batch"),
        num_threads=COMPUTE_WGS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True))(q, k, v, kpre, vcol, frows)
    return o, stats[:n_stats]


def config(q_shape, k_shape, dtype: str, *, scale, causal, which, n_faults, blocks: MosaicBlocks, interpret=False,
           debug=False) -> Config:
    """The static settings of a launch: ``which`` checks; ``n_faults > 0`` compiles the injection in."""
    if why := _lacks(which):
        raise ValueError(why)
    B, T, N, H = q_shape
    S, K = k_shape[1], k_shape[2]
    return Config(
        T=T, S=S, G=N // K, scale=float(scale), causal=causal, block_kv=blocks.block_kv, stages=blocks.stages,
        qk="qk_row" in which, dmr="softmax_dmr" in which, pv="pv_row" in which, exp="softmax_exp" in which,
        coef=tol.fused_coefficients(S, H, dtype, BLOCK_Q, blocks.block_kv, CHUNK), inject=n_faults > 0,
        late_checks=blocks.late_checks, ping_pong=blocks.ping_pong, overlap=blocks.overlap, fma_cols=blocks.fma_cols, exp_logs=blocks.exp_logs,
        vcol_unscale=1.0 / tol.fused_vcol_scale(dtype, H))


def launch(q, k, v, ft, fv, cfg: Config) -> KernelOutput:
    """Pad to whole blocks, compute the side inputs, run the kernel, cut the padding off."""
    T, S, BN = cfg.T, cfg.S, cfg.block_kv
    rows = COMPUTE_WGS * BLOCK_Q
    Tp, Sp = -(-T // rows) * rows, -(-S // BN) * BN
    qp, kp, vp = pad_to(q, 1, Tp), pad_to(k, 1, Sp), pad_to(v, 1, Sp)
    kpre, vcol, kv_finite = side_inputs(kp, vp, S, CHUNK, cfg.qk, cfg.pv, 1.0 / cfg.vcol_unscale, ones=cfg.exp)
    frows = fault_rows(ft, fv, q.shape[0], q.shape[2], Tp) if cfg.inject else None
    o, stats = forward(qp, kp, vp, kpre, vcol, cfg, frows)
    stats = [x[..., :T] for x in stats]
    if cfg.qk:
        qfin, stats = stats[0], stats[1:]
    else:
        qfin = jnp.all(jnp.isfinite(q), axis=-1).astype(F32).transpose(0, 2, 1)
    return KernelOutput(o[:, :T], qfin, tuple(stats), kv_finite)
