"""Launch the Triton kernels of :mod:`.triton_kernel`: the kernel module of ``implementation="triton"``.

Its interface is that of a kernel module: :class:`BlockSizes` (validated on
construction), :func:`unsupported` (why a call cannot run here, or None) and
:func:`forward`, the launch, returning a :class:`Launch`. Whether Triton
compiles the kernels or interprets them is decided when they are first
imported (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations


import importlib.util
import os
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ftattn_spec import exp_checksum
from ftattn_spec import faults as spec_faults
from ftattn_spec import masking
from ftattn_spec import backward_tolerances as btol
from ftattn_spec import tolerances as tol
from ftattn_spec.backward_blocks import BackwardBlocks
from ftattn_spec.faults import SITES, FaultPlan

from .blocks import BlockSizes, default_tma, descriptors

_MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis
#: the stats planes of each check the kernel runs
STAT_PLANES = {"qk_row": 0, "softmax_dmr": 1, "pv_row": 2, "softmax_exp": 3}


_KERNELS = None


def _kernels():
    """Import the kernels (once), compiled or interpreted; errors say how to get either."""
    global _KERNELS
    if _KERNELS is None:
        if importlib.util.find_spec("triton") is None:
            raise ValueError("implementation: 'triton' needs the triton package (pip install triton), "
                             "which is not installed")
        from . import triton_kernel

        _KERNELS = triton_kernel
    return _KERNELS


_INTERPRETING: bool | None = None


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` at import).

    Found once and kept in a plain bool, so that ``torch.compile`` can trace the callers
    (it cannot trace the kernel object); a first call made while compiling reads the
    environment variable instead.
    """
    global _INTERPRETING
    if _INTERPRETING is None:
        if torch.compiler.is_compiling():
            return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        mod = _kernels()
        _INTERPRETING = type(mod._forward).__name__ == "InterpretedFunction"
    return _INTERPRETING


def unsupported(device_type: str) -> str | None:
    """Why the kernel cannot run on a device of this type (``query.device.type``) here, or None
    (the catalogue has judged the arguments). The sentence starts with ``implementation: 'triton'``."""
    if device_type == "cuda":
        if interpreting():
            return ("implementation: 'triton' got CUDA tensors, but TRITON_INTERPRET=1 was set when "
                    "the kernels were imported; unset it to compile them for the GPU")
        return None
    if not interpreting():
        return (f"implementation: 'triton' needs CUDA tensors (got {device_type}), or Triton's "
                f"interpreter: set the environment variable TRITON_INTERPRET=1 before the first call "
                f"(before triton is imported) to run the kernel on the CPU, slowly")
    if tuple(int(x) for x in np.__version__.split(".")[:2]) >= (2, 4) and _triton_version() < (3, 7):
        return (f"implementation: 'triton' in Triton's interpreter needs numpy < 2.4 with triton "
                f"{_triton_version()} (its interpreter fails on numpy >= 2.4: triton-lang/triton "
                f"issue 9171), got numpy {np.__version__}")
    return None


def auto_reason(device_type: str) -> str | None:
    """Why ``implementation="auto"`` cannot take the kernel on a device of this type (None: it
    can). Off CUDA it never takes it (Triton's interpreter is for tests); on CUDA it needs triton,
    compiled."""
    if device_type != "cuda":
        return f"not on a GPU (the query is on {device_type})"
    try:
        return unsupported(device_type)
    except ValueError as e:  # triton is not installed
        return str(e)


def _triton_version() -> tuple[int, int]:
    import triton

    return tuple(int(x) for x in triton.__version__.split(".")[:2])


_DUMMIES: dict = {}


def _dummy(device) -> Tensor:
    """A one-element int32 tensor on ``device`` for the pointer arguments a launch does not use."""
    key = str(device)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _DUMMIES[key]


def _fault_tensors(plan: FaultPlan | None, device, sites=("scores", "probs", "out", "rescale", "rowsum")
                   ) -> tuple[Tensor, Tensor, int]:
    """The plan's faults at the kernel's ``sites`` as int32 ``(F, 8)`` rows
    (``ftattn_spec.faults.FAULT_ROW``) and float32 ``(F,)`` values."""
    kernel_sites = {SITES.index(s) for s in sites}
    rows = [] if plan is None else [f for f in range(len(plan)) if int(plan.site[f]) in kernel_sites]
    if not rows:  # the kernel reads nothing from these (n_faults = 0)
        dummy = _dummy(device)
        return dummy, dummy, 0
    ints, values = spec_faults.pack_rows(plan)
    ints, values = ints[rows].astype(np.int32), values[rows].astype(np.float32)
    return (torch.from_numpy(ints).to(device), torch.from_numpy(values).to(device), len(rows))


class Launch(NamedTuple):
    """What :func:`forward` returns (see there)."""

    out: Tensor
    stats: Tensor | None
    flags: Tensor | None
    count: Tensor | None
    blocks: BlockSizes
    compiled: object


class Masks(NamedTuple):
    """The mask forms of one launch, as the kernel reads them (``ftattn_spec.masking``'s
    semantics): a bool ``mask`` and a float ``bias`` broadcastable to ``(B, N, T, S)``, int
    ``(B,)`` lengths, a window ``(left, right)``, and ``is_causal``. None where not given."""

    mask: Tensor | None = None
    bias: Tensor | None = None
    query_lengths: Tensor | None = None
    key_lengths: Tensor | None = None
    window: tuple[int, int] | None = None
    is_causal: bool = False


def _dense(x: Tensor | None, shape, dummy: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``x`` (rank <= 4) as the kernel reads it: a tensor and its ``B N T S`` strides (0 where broadcast)."""
    if x is None:
        return dummy, (0, 0, 0, 0)
    x = x.reshape((1,) * (4 - x.ndim) + tuple(x.shape)).expand(*shape)
    if x.dtype == torch.bool:
        x = x.view(torch.uint8)
    return x, x.stride()


def forward(query: Tensor, key: Tensor, value: Tensor, *, scale: float, is_causal: bool, checks_on: bool,
            plan: FaultPlan | None = None, blocks: BlockSizes | None = None, redo: Tensor | None = None,
            out: Tensor | None = None, signed: bool = False, count_inputs: bool = True,
            which: tuple[str, ...] | None = None, masks: Masks | None = None, lse: Tensor | None = None):
    """Launch the kernels; returns a :class:`Launch` ``(out, stats, flags, count, blocks, compiled)``.

    ``stats`` is float32 ``(8, B, N, T)``: (residual, threshold) of
    ``qk_row``, ``softmax_dmr``, ``pv_row`` and ``softmax_exp`` (planes
    ``STAT_PLANES``; signed differences instead of residuals with
    ``signed=True``, except ``softmax_dmr`` and ``softmax_exp``, whose
    residual is a ratio with threshold 1); ``flags`` bool ``(4, B, N, T)``;
    ``count`` int32 ``(2,)``: flagged rows and non-finite input elements
    (None, None, None without checks and without ``count_inputs``).
    ``redo`` (int32 ``(R, 2)`` of (query block, b·N + n)) recomputes only those
    blocks into ``out``, without checks or faults. ``which`` restricts the
    checks to some of ``STAT_PLANES`` (default: all
    of them when ``checks_on``; each is compiled in only if asked). ``masks``
    (:class:`Masks`) holds every mask form besides ``is_causal``. ``compiled``
    is what the forward launch returned (on a GPU, the compiled kernel, whose
    ``asm`` holds its PTX). ``lse`` (float32 ``(B, N, T)``, contiguous): where the
    rows' base-2 log-sum-exp is written, for :func:`backward` (also by a ``redo``).
    """
    kern = _kernels()
    B, N, T, H = query.shape
    K, S = key.shape[1], key.shape[2]
    dev = query.device
    interp = interpreting()
    masks = (masks or Masks())._replace(is_causal=is_causal)
    bs = blocks or BlockSizes.get_default(interp, checks_on and redo is None, T,
                                          dense=masks.mask is not None or masks.bias is not None)
    if blocks is None and redo is None:  # (the recomputation of flagged blocks keeps pointer reads: not timed)
        bs = default_tma(bs, checks_on, interpreting(), key, value)
    upcast = interp and query.dtype == torch.bfloat16  # the interpreter's bf16 tl.dot is wrong
    chunk = min(tol.FUSED_CHUNK, bs.block_n)  # the pre-pass sums K over chunks; a tile adds block_n // chunk
    n_chunks = -(-S // chunk)
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=dev)  # contiguous, whatever the query's strides
    checks_on = checks_on and redo is None
    which = tuple(STAT_PLANES) if which is None else tuple(which)
    if not set(which) <= set(STAT_PLANES):
        raise ValueError(f"which: expected checks among {tuple(STAT_PLANES)}, got {which}")
    checks_on = checks_on and bool(which)
    count_inputs = count_inputs and redo is None
    ft, fv, n_faults = _fault_tensors(plan if redo is None else None, dev)
    dummy = _dummy(dev)
    stats = flags = count = ksum = vcol = None
    if checks_on or count_inputs:
        count = torch.zeros(2, dtype=torch.int32, device=dev)
    if checks_on:
        ksum = torch.empty((B, K, n_chunks, 2, H), dtype=torch.float32, device=dev)
        vcol = torch.empty((B, K, S, 16), dtype=query.dtype, device=dev)
        stats = torch.empty((2 * len(STAT_PLANES), B, N, T), dtype=torch.float32, device=dev)
        flags = torch.empty((len(STAT_PLANES), B, N, T), dtype=torch.bool, device=dev)
    vcol_scale = tol.fused_vcol_scale(dtype_name(query), H)  # V's column sums are stored times this (exact)
    if count_inputs:  # with the checks: also the sums of K and the columns of V
        kern._prepass[(B * K, n_chunks)](
            key, value, ksum if checks_on else dummy, vcol if checks_on else dummy, count,
            *key.stride(), *value.stride(), K, S, n_chunks, vcol_scale, H=H, CHUNK=chunk,
            SUMS=checks_on and bool({"qk_row", "pv_row", "softmax_exp"} & set(which)),
            num_warps=4 if not interp else 1)
    coef = tol.fused_coefficients(S, H, dtype_name(query), bs.block_m, bs.block_n, chunk)  # 9 scalars, in kernel order
    pick = lambda x: dummy if x is None else x  # noqa: E731
    mask_t, mask_st = _dense(masks.mask, (B, N, T, S), dummy)
    bias_t, bias_st = _dense(masks.bias, (B, N, T, S), dummy)
    lengths = [dummy if x is None else x.contiguous() for x in (masks.query_lengths, masks.key_lengths)]
    left, right = masking.band(masks.window, masks.is_causal)
    kd, vd, vcd = descriptors(bs, key, value, vcol)
    slices = [(0, redo.shape[0])] if redo is not None else [(o, min(B * N - o, _MAX_GRID_Y))
                                                           for o in range(0, B * N, _MAX_GRID_Y)]
    for offset, size in slices:
        grid = (size,) if redo is not None else (-(-T // bs.block_m), size)
        compiled = kern._forward[grid](
            query, kd, vd, out, pick(lse), pick(ksum), pick(vcd), pick(stats), pick(flags), pick(count), ft, fv,
            pick(redo), mask_t, bias_t, *lengths,
            *query.stride(), *key.stride(), *value.stride(), *out.stride(), *mask_st, *bias_st,
            N, N // K, K, T, S, n_chunks, n_faults, B * N * T, offset, scale, left, right,
            *coef, 1.0 / vcol_scale, *exp_checksum.exp_coefficients(bs.block_n, S),
            *exp_checksum.rescale_coefficients(), *exp_checksum.sum_coefficients(S, dtype_name(query), bs.block_n),
            H=H, BLOCK_M=bs.block_m, BLOCK_N=bs.block_n, CHUNK=chunk,
            HAS_MASK=masks.mask is not None, HAS_BIAS=masks.bias is not None,
            HAS_QLEN=masks.query_lengths is not None, HAS_KLEN=masks.key_lengths is not None,
            QK=checks_on and "qk_row" in which, DMR=checks_on and "softmax_dmr" in which,
            PV=checks_on and "pv_row" in which, INJECT=n_faults > 0, REDO_MODE=redo is not None, UPCAST=upcast,
            SIGNED=signed, REPLICA_FMA=bs.replica == "fma", STORE_LSE=lse is not None,
            EXPC=(2 if bs.exp_logs == "pairs" else 1) if checks_on and "softmax_exp" in which else 0,
            TMA=(1 + bs.tma_vcol) if bs.tma else 0, num_warps=bs.num_warps,
            num_stages=bs.num_stages)
    return Launch(out, stats, flags, count, bs, compiled)


_BACKWARD = None


def _backward_kernels():
    global _BACKWARD
    if _BACKWARD is None:
        _kernels()  # the same import checks
        from . import triton_backward

        _BACKWARD = triton_backward
    return _BACKWARD


#: the backward's checks, in the planes of its two stats arrays
#: (B, N, T), judged by the dQ kernel
BACKWARD_ROW_CHECKS = ("bwd_qk_row", "bwd_dp_row", "bwd_softmax", "bwd_dq", "bwd_d", "bwd_ds")
#: (B, K): the dK/dV kernel's P and dS, per head group (``_group_checks``)
BACKWARD_GROUP_CHECKS = ("bwd_softmax_kv",)
#: (B, K, S), judged by the dK/dV kernel
BACKWARD_KEY_CHECKS = ("bwd_qk_col", "bwd_dp_col", "bwd_dk", "bwd_dv", "bwd_ds_col", "bwd_softmax_col")


class BackwardLaunch(NamedTuple):
    """What :func:`backward` returns: the gradients, ``ds`` (the logits' gradient, float32
    ``(B, N, T, S)``, only for a bias), and with checks the (residual, threshold) planes and
    flags of ``BACKWARD_ROW_CHECKS`` (``(6·2, B, N, T)``, ``(6, B, N, T)``) and
    ``BACKWARD_KEY_CHECKS`` (``(6·2, B, K, S)``, ``(6, B, K, S)``), and ``count`` int32 ``(2,)``:
    flagged query rows and flagged keys."""

    dq: Tensor
    dk: Tensor
    dv: Tensor
    ds: Tensor | None
    row_stats: Tensor | None
    row_flags: Tensor | None
    key_stats: Tensor | None
    key_flags: Tensor | None
    count: Tensor | None
    #: ``BACKWARD_GROUP_CHECKS``' (residual, threshold) pairs, ``(B, K)`` each
    group: tuple | None = None
    #: with ``partial``: the dK/dV kernel's totals of P, float32 ``(1, B·K, key blocks)``
    blocks: Tensor | None = None


def backward(query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor, *,
             scale: float, masks: Masks, bias_grad: bool = False, checks: bool = True,
             plan: FaultPlan | None = None, blocks: BackwardBlocks | None = None,
             forward_block_n: int | None = None, partial: bool = False,
             grad_dtype: torch.dtype | None = None) -> BackwardLaunch:
    """The fused backward (:mod:`.triton_backward`), with its checks unless ``checks=False``;
    faults of ``plan`` at the backward's sites are injected in the kernels.

    ``partial``: the keys are one part of the rows' (a step of a ring, ``lse`` the whole row's):
    ``bwd_softmax``'s plane holds each row's signed Σ p of these keys (its flags mean nothing),
    ``group`` is None and ``blocks`` holds the dK/dV kernel's totals of P instead, for the caller
    to judge over all parts. ``grad_dtype``: the gradients' dtype (default: the inputs')."""
    kern = _backward_kernels()
    B, N, T, H = query.shape
    K, S = key.shape[1], key.shape[2]
    dev = query.device
    interp = interpreting()
    bs = blocks or BackwardBlocks.get_default(interp)
    upcast = interp and query.dtype == torch.bfloat16
    dq = torch.empty(query.shape, dtype=grad_dtype or query.dtype, device=dev)
    dk = torch.empty(key.shape, dtype=grad_dtype or key.dtype, device=dev)
    dv = torch.empty(value.shape, dtype=grad_dtype or value.dtype, device=dev)
    dummy = _dummy(dev)
    ds = torch.zeros((B, N, T, S), dtype=torch.float32, device=dev) if bias_grad else None
    mask_t, mask_st = _dense(masks.mask, (B, N, T, S), dummy)
    bias_t, bias_st = _dense(masks.bias, (B, N, T, S), dummy)
    lengths = [dummy if x is None else x.contiguous() for x in (masks.query_lengths, masks.key_lengths)]
    left, right = masking.band(masks.window, masks.is_causal)
    ft, fv, n_faults = _fault_tensors(plan, dev, spec_faults.BACKWARD_SITES)
    n_mblocks, n_nblocks = -(-T // bs.block_m), -(-S // bs.block_n)
    f32 = dict(dtype=torch.float32, device=dev)
    dd = torch.empty((B, N, T), **f32)  # D_i = Σ_h dO_ih·O_ih
    row_stats = row_flags = key_stats = key_flags = count = blocks_out = None
    # the checks' operand sums and weights (module docstring of triton_backward)
    rb, wq, kb, wk, vmax, totdo, dob, vb = (dummy,) * 8
    if checks:
        row_stats = torch.empty((2 * len(BACKWARD_ROW_CHECKS), B, N, T), **f32)
        row_flags = torch.empty((len(BACKWARD_ROW_CHECKS), B, N, T), dtype=torch.bool, device=dev)
        key_stats = torch.empty((2 * len(BACKWARD_KEY_CHECKS), B, K, S), **f32)
        key_flags = torch.empty((len(BACKWARD_KEY_CHECKS), B, K, S), dtype=torch.bool, device=dev)
        count = torch.zeros(2, dtype=torch.int32, device=dev)
        blocks_out = torch.empty((1, B * K, n_nblocks), **f32)
        # per block, for bwd_ds_col's bounds: Σ_i ‖dO_i‖∞ and max_j ‖v_j‖₁ (the prepass writes them)
        dob, vb = torch.zeros((B * N, n_mblocks), **f32), torch.zeros((B * K, n_nblocks), **f32)
        rb, kb = torch.empty((4, B * N, n_mblocks, H), **f32), torch.empty((4, B * K, n_nblocks, H), **f32)
        wq = torch.empty((B, N, T, 16), dtype=query.dtype, device=dev)
        wk = torch.empty((B, K, S, 16), dtype=query.dtype, device=dev)
    coef = btol.backward_coefficients(T, S, H, N // K, dtype_name(query), bs.block_m, bs.block_n,
                                      forward_block_n or bs.block_n)
    pick = lambda x: dummy if x is None else x  # noqa: E731
    flags = dict(H=H, BLOCK_M=bs.block_m, BLOCK_N=bs.block_n, HAS_MASK=masks.mask is not None,
                 HAS_BIAS=masks.bias is not None, HAS_QLEN=masks.query_lengths is not None,
                 HAS_KLEN=masks.key_lengths is not None, CHECKS=checks, INJECT=n_faults > 0, UPCAST=upcast,
                 num_warps=bs.num_warps, num_stages=bs.num_stages)
    small = dict(H=H, num_warps=bs.num_warps)
    common = (*query.stride(), *key.stride(), *value.stride(), *grad_out.stride())
    for offset in range(0, B * N, _MAX_GRID_Y):
        kern._bwd_rows[(n_mblocks, min(B * N - offset, _MAX_GRID_Y))](
            query, grad_out, out, dd, rb, wq, dob, *query.stride(), *grad_out.stride(), *out.stride(), N, T, offset,
            B * N * n_mblocks * H, coef.sigma, BLOCK_M=bs.block_m, CHECKS=checks, **small)
    if checks:
        for offset in range(0, B * K, _MAX_GRID_Y):
            kern._bwd_keys[(n_nblocks, min(B * K - offset, _MAX_GRID_Y))](
                key, value, kb, wk, vb, *key.stride(), *value.stride(), K, S, offset, B * K * n_nblocks * H,
                coef.sigma, BLOCK_N=bs.block_n, **small)
        # bwd_ds_col's bounds per (batch, kv head): max_j ‖v_j‖₁ and the group's Σ_i ‖dO_i‖∞
        vmax = vb.amax(-1).view(B, K) if n_nblocks else torch.zeros((B, K), **f32)
        totdo = dob.view(B, K, (N // K) * n_mblocks).sum(-1)
    for offset in range(0, B * K, _MAX_GRID_Y):
        kern._bwd_dkdv[(n_nblocks, min(B * K - offset, _MAX_GRID_Y))](
            query, key, value, grad_out, lse, dd, dk, dv, mask_t, bias_t, *lengths, rb, wq, vmax, totdo, pick(key_stats),
            pick(key_flags), dummy if count is None else count[1:], ft, fv, pick(blocks_out), *common,
            *dk.stride(), *dv.stride(), *mask_st, *bias_st, N, N // K, K, T, S, scale, left, right, offset,
            n_faults, B * K * S, B * N * n_mblocks * H, n_mblocks,
            coef.qk_col, coef.dp_col, coef.dk, coef.dv, coef.ds, coef.softmax_col, coef.allow_col, coef.sigma,
            coef.mag_up, coef.under, coef.p_under, **flags)
    for offset in range(0, B * N, _MAX_GRID_Y):
        kern._bwd_dq[(n_mblocks, min(B * N - offset, _MAX_GRID_Y))](
            query, key, value, grad_out, out, lse, dd, dq, pick(ds), mask_t, bias_t, *lengths, kb, wk,
            pick(row_stats), pick(row_flags), pick(count), ft, fv, *common, *out.stride(), *dq.stride(), *mask_st,
            *bias_st, N, N // K, K, T, S, scale, left, right, offset, n_faults, B * N * T,
            B * K * n_nblocks * H, n_nblocks, coef.qk_row, coef.dp_row, coef.dq, coef.d, coef.softmax0,
            coef.softmax_mu, coef.ds, coef.allow_row, coef.sigma, coef.mag_up, coef.under, coef.p_under,
            STORE_DS=bias_grad, PARTIAL=partial,
            **flags)
    group = _group_checks(blocks_out, row_stats, lse, K, bs, S) if checks and not partial else None
    return BackwardLaunch(dq, dk, dv, ds, row_stats, row_flags, key_stats, key_flags, count, group,
                          blocks_out if partial else None)


def _group_checks(blocks_out: Tensor, row_stats: Tensor, lse: Tensor, K: int, bs: "BackwardBlocks", S: int):
    """``BACKWARD_GROUP_CHECKS``: the dK/dV kernel's total of P per head group against the
    attended rows, with a threshold twice the sum of the rows' own (the same terms summed in
    another order) plus the reordering of the sum (γ of the tile and of the block chain, on a
    total that is the number of rows). Returns one (residual, threshold) pair, ``(B, K)`` each."""
    B, N, T = lse.shape
    totals = blocks_out.sum(-1).view(B, K)
    attended = torch.isfinite(lse).view(B, K, -1).sum(-1).to(torch.float32)
    soft = row_stats[2 * BACKWARD_ROW_CHECKS.index("bwd_softmax") + 1].view(B, K, -1).sum(-1)
    order = tol.gamma(bs.block_m * bs.block_n) + tol.gamma(-(-S // bs.block_n) + 1) + tol.gamma(N // K * T + 1)
    return ((totals - attended).abs(), 2.0 * soft + order * attended),


def dtype_name(x: Tensor) -> str:
    return str(x.dtype).removeprefix("torch.")
