"""``implementation="pallas"``: the fused, self-checking forward of :mod:`.pallas_kernel`.

``api.attention`` validates and calls :func:`run`. This module checks what the
kernel supports, pads the inputs to whole blocks, computes the kernel's side
inputs (sums of K, columns of V) in XLA, launches the kernel, turns its
per-row statistics into the usual ``Report``, applies ``on_fault`` and gives
``jax.grad`` the backward of plain attention (a ``custom_vjp``).

The kernel checks rows only (``qk_row``, ``softmax_dmr``, ``pv_row``), like the
Triton kernel of ``ftattn_torch``: ``full`` runs those three, ``located`` is
empty, and ``on_fault="correct"`` recomputes the output (once, only when
something was flagged) and takes the flagged rows from the recomputation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

from ftattn_spec import tolerances as tol
from ftattn_spec.report import make_report
from ftattn_spec.validation import check_fused_supported, implementation_checks

from . import checks, faults, kernel_faults
from . import mosaic_kernel as mosaic
from . import pallas_compat as compat
from . import pallas_kernel as kernel

F32 = jnp.float32
_CHECK_ORDER = ("qk_row", "softmax_dmr", "pv_row")
LOWERINGS = ("auto", "triton", "mosaic_gpu")
MOSAIC_HEAD_DIMS = (64, 128)


@dataclass(frozen=True)
class BlockSizes:
    """Tile shape and launch settings of the portable kernel.

    ``block_m`` query rows per program, ``block_n`` keys per tile (powers of
    two, at least 16).
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def get_default(cls, interpret: bool, head_dim: int = 128, checks: bool = True) -> "BlockSizes":
        """Interpret mode: small tiles (fast on small tests, and several tiles per row).
        GPU: measured on an H100 (docs/kernels.md)."""
        if interpret:
            return cls(16, 16, 1, 1)
        return cls(128, 64, 8, 3) if checks else cls(128, 64, 4, 2)

    def validate(self) -> "BlockSizes":
        for name in ("block_m", "block_n"):
            x = getattr(self, name)
            if not isinstance(x, int) or x < 16 or x & (x - 1):
                raise ValueError(f"blocks.{name}: expected a power of two >= 16, got {x!r}")
        return self


@dataclass(frozen=True)
class MosaicBlocks:
    """Settings of the Hopper kernel: ``block_kv`` keys per tile (64 or 128) and
    ``stages`` shared-memory slots in the K/V ring (query rows are fixed: two
    warpgroups of 64)."""

    block_kv: int = 128
    stages: int = 2
    late_checks: bool = False  # the checks that feed nothing run while the P·V MMA does
    ping_pong: bool = True  # the compute warpgroups take turns on the tensor cores
    fma_cols: int = 0  # columns of a tile whose replica exponentials run on the FMA pipe (a multiple of 8)

    @classmethod
    def get_default(cls, head_dim: int = 128, checks: bool = True) -> "MosaicBlocks":
        """The H200 sweeps' best (docs/kernels.md, M2–M6) for every head dim, checks on or off."""
        return cls()

    def validate(self) -> "MosaicBlocks":
        if self.block_kv not in (64, 128):
            raise ValueError(f"blocks.block_kv: expected 64 or 128, got {self.block_kv!r}")
        if not isinstance(self.fma_cols, int) or self.fma_cols % 8 or not 0 <= self.fma_cols <= self.block_kv:
            raise ValueError(f"blocks.fma_cols: expected a multiple of 8 in [0, block_kv], got {self.fma_cols!r}")
        if not isinstance(self.stages, int) or not 2 <= self.stages <= 4:
            raise ValueError(f"blocks.stages: expected an int in [2, 4], got {self.stages!r}")
        return self


def platform_of(x) -> str:
    """The platform an array lives on (``"cpu"``, ``"gpu"``...); for a tracer, the default backend."""
    try:
        return next(iter(x.devices())).platform
    except (AttributeError, jax.errors.ConcretizationTypeError, StopIteration, TypeError):
        return jax.default_backend()


def check_supported(query, *, scheme: str, masking: dict) -> None:
    """Raise ``ValueError``/``TypeError`` naming the limit for what the kernel cannot run."""
    check_fused_supported("pallas", scheme, jnp.dtype(query.dtype).name, query.shape, masking)


def _split3(x: Float[Array, "..."], dtype) -> list[Array]:
    """float32 ``x`` as hi + mid + lo in ``dtype`` (their float32 sum carries ~float32 accuracy).

    Each part passes an optimization barrier before it is widened again: XLA
    removes a float32 → float16 → float32 round trip by default
    (``xla_allow_excess_precision``; seen on an H100: ``mid`` and ``lo`` came
    out zero and ``pv_row`` flagged clean rows). ``lax.reduce_precision``
    would survive too, but it flushes parts below the normal range to zero.
    """
    parts, r = [], x
    for _ in range(3):
        part = lax.optimization_barrier(r.astype(dtype))
        parts.append(part)
        r = r - part.astype(F32)
    return parts


def _finite_from(sums, x):
    """Whether ``x`` is all finite, read off float32 sums of ``|x|`` when they are finite (a
    non-finite element makes its sum inf or NaN); otherwise (or when the sums overflowed) by
    a pass over ``x``. ``sums`` None: the pass."""
    if sums is None:
        return jnp.all(jnp.isfinite(x))
    return lax.cond(jnp.all(jnp.isfinite(sums)), lambda: jnp.asarray(True), lambda: jnp.all(jnp.isfinite(x)))


def _side_inputs(k: Float[Array, "B S K H"], v: Float[Array, "B S K H"], S: int, chunk: int, qk: bool, pv: bool,
                 vcol_scale: float):
    """``kpre`` float32 ``(B, K, C+1, 2, H)`` and ``vcol`` ``(B, K, S, 16)`` (see :mod:`.pallas_kernel`;
    None where the check is off), and whether the first S keys and values are all finite,
    read off the same sums where the checks need them. ``vcol`` holds ``vcol_scale`` times
    the column sums (``tol.fused_vcol_scale``, a power of two: exact)."""
    kpre = vcol = kabs = vabs = None
    B, Sp, K, H = k.shape
    if qk:
        C = -(-S // chunk)
        kf = k[:, :S].astype(F32)
        kf = jnp.pad(kf, ((0, 0), (0, C * chunk - S), (0, 0), (0, 0))).reshape(B, C, chunk, K, H)
        sums = jnp.stack([kf.sum(2), jnp.abs(kf).sum(2)], axis=2)  # B C 2 K H
        pre = jnp.cumsum(sums, axis=1)
        pre = jnp.concatenate([jnp.zeros_like(pre[:, :1]), pre], axis=1)  # exclusive: B C+1 2 K H
        kpre = pre.transpose(0, 3, 1, 2, 4)
        kabs = pre[:, -1, 1]  # Σ_j |k_j| per (b, kv head, h): B K H
    if pv:
        vf = v.astype(F32)
        w = jnp.abs(vf).sum(-1)
        parts = _split3(vf.sum(-1) * vcol_scale, v.dtype) + _split3(w * vcol_scale, v.dtype)  # B Sp K each
        zeros = jnp.zeros_like(parts[0])
        vcol = jnp.stack(parts + [zeros] * (kernel.VCOLS - 6), axis=-1).transpose(0, 2, 1, 3)  # B K Sp 16
        vabs = w[:, :S]
    finite = _finite_from(kabs, k[:, :S]) & _finite_from(vabs, v[:, :S])
    return kpre, vcol, finite


@functools.lru_cache(maxsize=256)
def _coefficients(S: int, H: int, dtype: str, block_m: int, block_n: int, chunk: int) -> tuple[float, ...]:
    return (tol.fused_qk_coefficient(S, H, dtype, block_m, block_n, chunk), tol.underflow_allowance(4 * (S + 1) * (H + 1)),
            *tol.fused_pv_coefficients(S, H, dtype), *tol.fused_dmr_coefficients(S, block_n))


def _config(q_shape, k_shape, dtype: str, *, scale, causal, which, n_faults, blocks, interpret,
            debug=False):
    B, T, N, H = q_shape
    S, K = k_shape[1], k_shape[2]
    if isinstance(blocks, MosaicBlocks):
        return mosaic.Config(
            T=T, S=S, G=N // K, scale=float(scale), causal=causal, block_kv=blocks.block_kv, stages=blocks.stages,
            qk="qk_row" in which, dmr="softmax_dmr" in which, pv="pv_row" in which,
            coef=_coefficients(S, H, dtype, mosaic.BLOCK_Q, blocks.block_kv, mosaic.CHUNK), inject=n_faults > 0,
            late_checks=blocks.late_checks, ping_pong=blocks.ping_pong, fma_cols=blocks.fma_cols,
            vcol_unscale=1.0 / tol.fused_vcol_scale(dtype, H))
    chunk = tol.FUSED_CHUNK if blocks.block_m % tol.FUSED_CHUNK == 0 else blocks.block_m
    return kernel.Config(
        T=T, S=S, G=N // K, scale=float(scale), causal=causal, block_m=blocks.block_m, block_n=blocks.block_n,
        chunk=chunk, qk="qk_row" in which, dmr="softmax_dmr" in which, pv="pv_row" in which, n_faults=n_faults,
        coef=_coefficients(S, H, dtype, blocks.block_m, blocks.block_n, chunk),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages, interpret=interpret, debug=debug,
        vcol_unscale=1.0 / tol.fused_vcol_scale(dtype, H))


def _pad_to(x, axis: int, size: int):
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _launch_mosaic(q, k, v, ft, fv, cfg: mosaic.Config):
    T, S, BN = cfg.T, cfg.S, cfg.block_kv
    rows = mosaic.COMPUTE_WGS * mosaic.BLOCK_Q
    Tp, Sp = -(-T // rows) * rows, -(-S // BN) * BN
    qp, kp, vp = _pad_to(q, 1, Tp), _pad_to(k, 1, Sp), _pad_to(v, 1, Sp)
    kpre, vcol, kv_finite = _side_inputs(kp, vp, S, mosaic.CHUNK, cfg.qk, cfg.pv, 1.0 / cfg.vcol_unscale)
    frows = kernel_faults.fault_rows(ft, fv, q.shape[0], q.shape[2], Tp) if cfg.inject else None
    o, stats = mosaic.forward(qp, kp, vp, kpre, vcol, cfg, frows)
    stats = [x[..., :T] for x in stats]
    if cfg.qk:
        qfin, stats = stats[0], stats[1:]
    else:
        qfin = jnp.all(jnp.isfinite(q), axis=-1).astype(F32).transpose(0, 2, 1)
    return o[:, :T], qfin, tuple(stats), kv_finite


def _launch(q, k, v, ft, fv, cfg):
    """Pad, compute the side inputs, run the kernel, cut the padding off.

    Returns ``(out B T N H, qfin B N T, stats, kv_finite)``, ``stats`` a tuple of float32
    ``(B, N, T)``, ``kv_finite`` whether K and V are all finite (a bool scalar).
    """
    if isinstance(cfg, mosaic.Config):
        return _launch_mosaic(q, k, v, ft, fv, cfg)
    T, S, BM, BN = cfg.T, cfg.S, cfg.block_m, cfg.block_n
    Tp = -(-T // BM) * BM
    Sp = -(-S // BN) * BN
    if cfg.causal and cfg.qk:
        Sp = max(Sp, Tp)  # the diagonal block of the qk_row prediction reads keys up to Tp
    qp, kp, vp = _pad_to(q, 1, Tp), _pad_to(k, 1, Sp), _pad_to(v, 1, Sp)
    kpre, vcol, kv_finite = _side_inputs(kp, vp, S, cfg.chunk, cfg.qk, cfg.pv, 1.0 / cfg.vcol_unscale)
    o, qfin, stats = kernel.forward(qp, kp, vp, kpre, vcol, ft, fv, cfg)
    return o[:, :T], qfin[..., :T], tuple(x[..., :T] for x in stats), kv_finite


def _plain_attention(q, k, v, scale: float, causal: bool):
    """Plain attention in float32: the oracle of the backward pass (not checked)."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    qg = q.astype(F32).reshape(B, T, K, N // K, H)
    s = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(F32), precision=jax.lax.Precision.HIGHEST) * scale
    if causal:
        s = jnp.where(jnp.arange(S)[None, :] <= jnp.arange(T)[:, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bkgts,bskh->btkgh", p, v.astype(F32), precision=jax.lax.Precision.HIGHEST)
    return o.reshape(B, T, N, H)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend(q, k, v, ft, fv, cfg):
    return _launch(q, k, v, ft, fv, cfg)


def _attend_fwd(q, k, v, ft, fv, cfg):
    return _launch(q, k, v, ft, fv, cfg), (q, k, v, ft, fv)


def _attend_bwd(cfg, res, cts):
    q, k, v, ft, fv = res
    _, vjp = jax.vjp(lambda q, k, v: _plain_attention(q, k, v, cfg.scale, cfg.causal), q, k, v)
    dq, dk, dv = vjp(cts[0].astype(F32))
    zero_int = lambda x: None if x is None else np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zero_int(ft),
            None if fv is None else jnp.zeros_like(fv))


_attend.defvjp(_attend_fwd, _attend_bwd)


def _fault_table(plan: faults.DevicePlan | None):
    """The plan as the kernel's int32 ``(F·8,)`` and float32 ``(F,)``, F padded to a power of two."""
    if plan is None or plan.site.shape[0] == 0:
        return None, None, 0
    F = plan.site.shape[0]
    Fp = 1 << (F - 1).bit_length()
    ints = jnp.concatenate([plan.site[:, None], plan.replica[:, None], plan.index, plan.kind[:, None],
                            plan.bit[:, None]], axis=1).astype(jnp.int32)
    ints = jnp.concatenate([ints, jnp.full((Fp - F, 8), -1, jnp.int32)])
    values = jnp.concatenate([plan.value.astype(F32), jnp.zeros((Fp - F,), F32)])
    return ints.reshape(-1), values, Fp


def _slot_conflict(plan) -> bool:
    """True when two of the plan's in-kernel faults share a (site, replica, batch, head, row)."""
    idx = np.asarray(plan.index)
    keys = [(int(s), int(r), *map(int, i[:3])) for s, r, i in zip(np.asarray(plan.site), np.asarray(plan.replica), idx)
            if int(s) in (0, 1, 2)]
    return len(keys) != len(set(keys))


def mosaic_can_inject() -> bool:
    """Whether the Hopper kernel can inject faults itself (its bit flips need Mosaic GPU's
    bitcast of registers, jax >= 0.11)."""
    return compat.JAX_VERSION >= (0, 11, 0)


def validate_lowering(lowering) -> str:
    """``lowering`` as one of ``LOWERINGS`` (None is ``"auto"``), or ``ValueError`` naming it."""
    if lowering is None:
        return "auto"
    if not isinstance(lowering, str) or lowering not in LOWERINGS:
        raise ValueError(f"lowering: expected None or one of {LOWERINGS}, got {lowering!r}")
    return lowering


def select_lowering(query, *, lowering: str | None = None, interpret: bool | None = None, plan=None) -> str:
    """Which kernel ``implementation="pallas"`` runs: ``"triton"`` (the portable
    kernel) or ``"mosaic_gpu"`` (the Hopper kernel).

    ``lowering=None``/``"auto"`` takes the Hopper kernel when the query lives on
    an sm_90 GPU, the kernel is compiled (not interpreted), the head dim is 64
    or 128, and a fault plan, if any, has at most one fault per site and query
    row (the Hopper kernel reads faults from a per-row table) on jax >= 0.11;
    otherwise the portable kernel. Asking for
    ``"mosaic_gpu"`` where it cannot run raises ``ValueError`` naming why.
    """
    lowering = validate_lowering(lowering)
    if lowering == "triton":
        return lowering
    H = query.shape[-1]
    why = None
    if platform_of(query) != "gpu" or not mosaic.available():
        why = f"the query is on {platform_of(query)!r}, not an sm_90 (Hopper) GPU with Mosaic GPU available"
    elif interpret:
        why = "interpret=True (the Hopper kernel cannot run in interpret mode)"
    elif H not in MOSAIC_HEAD_DIMS:
        why = f"head dim H={H} (the Hopper kernel takes H in {MOSAIC_HEAD_DIMS})"
    elif plan is not None and not mosaic_can_inject():
        why = f"a fault plan was given and jax {jax.__version__} cannot inject faults in the Hopper kernel (needs 0.11)"
    elif plan is not None and _slot_conflict(plan):
        why = "the fault plan puts two faults on one query row of one site (the Hopper kernel takes one per row)"
    if why is None:
        return "mosaic_gpu"
    if lowering == "mosaic_gpu":
        raise ValueError(f"lowering: 'mosaic_gpu' cannot run here: {why}")
    return "triton"


def run(query, key, value, *, scheme: str, granularity: str, scale: float, is_causal: bool,
        on_fault: str = "report", plan=None, interpret: bool | None = None, blocks=None,
        lowering: str | None = None):
    """The fused path of ``attention``: inputs validated, :func:`check_supported` passed.

    ``interpret=None`` interprets unless the query lives on a GPU;
    ``lowering`` picks the kernel (:func:`select_lowering`); with ``lowering`` None or
    ``"auto"``, ``blocks`` (``BlockSizes`` or ``MosaicBlocks``) names it.
    """
    platform = platform_of(query)
    if interpret is None:
        interpret = platform != "gpu"
    elif not interpret and platform != "gpu":
        raise ValueError(f"interpret: False compiles the kernel for a GPU, but the query is on {platform!r}; "
                         f"use interpret=None or True to run it in Pallas' interpret mode")
    wanted = implementation_checks("pallas", scheme)
    if blocks is not None and lowering in (None, "auto"):  # the settings name their kernel
        lowering = "mosaic_gpu" if isinstance(blocks, MosaicBlocks) else "triton"
    chosen = select_lowering(query, lowering=lowering, interpret=interpret, plan=plan)
    kind = MosaicBlocks if chosen == "mosaic_gpu" else BlockSizes
    if blocks is not None and not isinstance(blocks, kind):
        raise TypeError(f"blocks: the {chosen!r} lowering expected {kind.__name__}, got {type(blocks).__name__}")
    if chosen == "mosaic_gpu":
        bs = (blocks or MosaicBlocks.get_default(query.shape[-1], bool(wanted))).validate()
    else:
        bs = (blocks or BlockSizes.get_default(interpret, query.shape[-1], bool(wanted))).validate()
    with compat.quiet_lowering():
        return _run(query, key, value, faults.to_device(plan), scheme=scheme, granularity=granularity,
                    scale=scale, is_causal=is_causal, on_fault=on_fault, interpret=bool(interpret), blocks=bs)


@functools.partial(jax.jit, static_argnames=("scheme", "granularity", "scale", "is_causal", "on_fault",
                                             "interpret", "blocks"))
def _run(query: Float[Array, "B T N H"], key: Float[Array, "B S K H"], value: Float[Array, "B S K H"], plan, *,
         scheme: str, granularity: str, scale: float, is_causal: bool, on_fault: str, interpret: bool,
         blocks: "BlockSizes | MosaicBlocks"):
    wanted = implementation_checks("pallas", scheme)
    dtype = jnp.dtype(query.dtype).name
    ft, fv, n_faults = _fault_table(plan)
    q = faults.inject(query, "query", "BTNH", plan)
    k = faults.inject(key, "key", "BSKH", plan)
    v = faults.inject(value, "value", "BSKH", plan)
    cfg = _config(query.shape, key.shape, dtype, scale=scale, causal=is_causal, which=wanted, n_faults=n_faults,
                  blocks=blocks, interpret=interpret)
    out, qfin, stats, kv_finite = _attend(q, k, v, ft, fv, cfg)
    qfin, stats = jax.lax.stop_gradient((qfin, stats))
    if plan is None:
        finite = jnp.all(qfin > 0) & kv_finite
    else:  # the kernel saw the corrupted inputs: judge the originals
        finite = jnp.all(jnp.isfinite(query)) & jnp.all(jnp.isfinite(key)) & jnp.all(jnp.isfinite(value))
    T = query.shape[1]
    results, rows = {}, None
    stat = iter(stats)
    for name in _CHECK_ORDER:
        if name not in wanted:
            continue
        diff, thr = next(stat), next(stat)
        r = checks.verdict(diff, thr, granularity, signed=(name != "softmax_dmr"))
        results[name] = r
        flag = jnp.broadcast_to(r.flagged[..., None], (*r.flagged.shape, T)) if granularity == "global" \
            else r.flagged
        rows = flag if rows is None else rows | flag
    detected = jnp.zeros((), bool)
    for r in results.values():
        detected = detected | jnp.any(r.flagged)
    corrected = jnp.zeros((), jnp.int32)
    if on_fault in ("correct", "nan") and rows is not None:
        rows_btn = jnp.swapaxes(rows, 1, 2)[..., None]  # B T N 1
        if on_fault == "correct":
            clean = _config(query.shape, key.shape, dtype, scale=scale, causal=is_causal, which=(), n_faults=0,
                            blocks=blocks, interpret=interpret)
            redo = lambda o: jnp.where(rows_btn, _attend(q, k, v, None, None, clean)[0], o)  # noqa: E731
            out = jax.lax.cond(detected, redo, lambda o: o, out)
            corrected = jnp.sum(rows, dtype=jnp.int32)
        else:
            out = jnp.where(rows_btn, jnp.asarray(jnp.nan, out.dtype), out)
    results = {name: results[name] for name in wanted}
    return out, make_report(detected=detected, checks=results, inputs_finite=finite, located={}, corrected=corrected)
