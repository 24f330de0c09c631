"""``implementation="triton"``: the fused, self-checking forward of ``triton_kernel``.

``api.attention`` validates and calls :func:`run`. This module checks what the
kernel supports, launches the pre-pass and the forward kernel, turns the
per-row statistics into the usual ``Report``, applies ``on_fault`` and gives
autograd the backward of plain attention.

Which checks run: the kernel checks rows only (``qk_row``, ``softmax_dmr``,
``pv_row``); a column check would need a reduction across programs, so
``full`` runs those three (see ``ftattn_spec.validation.implementation_checks``),
``located`` is empty, and ``on_fault="correct"`` recomputes the flagged query
blocks.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ftattn_spec import tolerances as tol
from ftattn_spec.faults import SITES, FaultPlan
from ftattn_spec.report import CheckResult, make_report
from ftattn_spec.validation import check_fused_supported, implementation_checks

from . import checks, faults

_MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis
_STAT_PLANES = {"qk_row": 0, "softmax_dmr": 1, "pv_row": 2}


@dataclass(frozen=True)
class BlockSizes:
    """Tile shape and launch settings of the forward kernel.

    ``block_m`` query rows per program (a multiple of ``tol.FUSED_CHUNK``
    on a GPU), ``block_n`` keys per tile.
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    #: how the softmax replica evaluates its exponentials: ``"fma"`` (a
    #: polynomial on the FMA pipe) or ``"mufu"`` (the special-function unit,
    #: like the primary, with a different argument formula).
    replica: str = "mufu"

    @classmethod
    def get_default(cls, interpret: bool, checks: bool = True) -> "BlockSizes":
        """Measured on an H100 (``python -m compare.kernel_bench --sweep``, docs/kernels.md)."""
        if interpret:  # the interpreter: small tiles run fastest on small tests
            return cls(16, 16, 1, 1)
        return cls(128, 128, 8, 2) if checks else cls(128, 128, 8, 3)


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


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` at import)."""
    mod = _kernels()
    return type(mod._forward).__name__ == "InterpretedFunction"


def check_supported(query: Tensor, key: Tensor, *, scheme: str, masking) -> None:
    """Raise ``ValueError``/``TypeError`` naming the limit for what the kernel cannot run."""
    check_fused_supported("triton", scheme, _dt(query), query.shape, masking)
    if query.device.type == "cuda":
        if interpreting():
            raise ValueError("implementation: 'triton' got CUDA tensors, but TRITON_INTERPRET=1 was set when "
                             "the kernels were imported; unset it to compile them for the GPU")
        return
    if not interpreting():
        raise ValueError(f"implementation: 'triton' needs CUDA tensors (got {query.device.type}), or Triton's "
                         f"interpreter: set the environment variable TRITON_INTERPRET=1 before the first call "
                         f"(before triton is imported) to run the kernel on the CPU, slowly")
    if tuple(int(x) for x in np.__version__.split(".")[:2]) >= (2, 4) and _triton_version() < (3, 7):
        raise ValueError(f"implementation: 'triton' in Triton's interpreter needs numpy < 2.4 with triton "
                         f"{_triton_version()} (its interpreter fails on numpy >= 2.4: triton-lang/triton "
                         f"issue 9171), got numpy {np.__version__}")


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


def _fault_tensors(plan: FaultPlan | None, device) -> tuple[Tensor, Tensor, int]:
    """The plan's faults at the kernel's sites as int32 ``(F, 8)`` and float32 ``(F,)``."""
    kernel_sites = {SITES.index(s) for s in ("scores", "probs", "out")}
    rows = [] if plan is None else [f for f in range(len(plan)) if int(plan.site[f]) in kernel_sites]
    if not rows:  # the kernel reads nothing from these (n_faults = 0)
        dummy = _dummy(device)
        return dummy, dummy, 0
    ints = np.stack([np.concatenate([[plan.site[f], plan.replica[f]], plan.index[f], [plan.kind[f], plan.bit[f]]])
                     for f in rows]).astype(np.int32)
    values = np.array([plan.value[f] for f in rows], np.float32)
    return (torch.from_numpy(ints).to(device), torch.from_numpy(values).to(device), len(rows))


def forward(query: Tensor, key: Tensor, value: Tensor, *, scale: float, is_causal: bool, checks_on: bool,
            plan: FaultPlan | None = None, blocks: BlockSizes | None = None, redo: Tensor | None = None,
            out: Tensor | None = None, signed: bool = False, count_inputs: bool = True,
            which: tuple[str, ...] | None = None):
    """Launch the kernels; returns ``(out, stats, flags, count, blocks, compiled)``.

    ``stats`` is float32 ``(6, B, N, T)``: (residual, threshold) of
    ``qk_row``, ``softmax_dmr`` and ``pv_row`` (signed differences instead
    of residuals with ``signed=True``); ``flags`` bool ``(3, B, N, T)``;
    ``count`` int32 ``(2,)``: flagged rows and non-finite input elements
    (None, None, None without checks and without ``count_inputs``).
    ``redo`` (int32 ``(R, 2)`` of (query block, b·N + n)) recomputes only those
    blocks into ``out``, without checks or faults. ``which`` restricts the
    checks to some of ``("qk_row", "softmax_dmr", "pv_row")`` (default: all
    three when ``checks_on``; each is compiled in only if asked). ``compiled`` is what the
    forward launch returned (on a GPU, the compiled kernel, whose ``asm``
    holds its PTX).
    """
    kern = _kernels()
    B, N, T, H = query.shape
    K, S = key.shape[1], key.shape[2]
    dev = query.device
    interp = interpreting()
    bs = blocks or BlockSizes.get_default(interp, checks_on and redo is None)
    upcast = interp and query.dtype == torch.bfloat16  # the interpreter's bf16 tl.dot is wrong
    chunk = tol.FUSED_CHUNK if not interp else min(tol.FUSED_CHUNK, bs.block_m)
    if bs.block_m % chunk:
        raise ValueError(f"blocks: expected block_m a multiple of {chunk}, got {bs.block_m}")
    n_chunks = -(-S // chunk)
    if out is None:
        out = torch.empty_like(query)
    checks_on = checks_on and redo is None
    which = tuple(_STAT_PLANES) if which is None else tuple(which)
    if not set(which) <= set(_STAT_PLANES):
        raise ValueError(f"which: expected checks among {tuple(_STAT_PLANES)}, got {which}")
    checks_on = checks_on and bool(which)
    count_inputs = count_inputs and redo is None
    ft, fv, n_faults = _fault_tensors(plan if redo is None else None, dev)
    dummy = _dummy(dev)
    stats = flags = count = ksum = vcol = None
    if checks_on or count_inputs:
        count = torch.zeros(2, dtype=torch.int32, device=dev)
    if checks_on:
        ksum = torch.empty((B, K, n_chunks + 1, 2, H), dtype=torch.float32, device=dev)
        vcol = torch.empty((B, K, S, 16), dtype=query.dtype, device=dev)
        stats = torch.empty((6, B, N, T), dtype=torch.float32, device=dev)
        flags = torch.empty((3, B, N, T), dtype=torch.bool, device=dev)
    vcol_scale = tol.fused_vcol_scale(_dt(query), H)  # V's column sums are stored times this (exact)
    if count_inputs:  # with the checks: also the sums of K and the columns of V
        kern._prepass[(B * K, n_chunks)](
            key, value, ksum if checks_on else dummy, vcol if checks_on else dummy, count,
            *key.stride(), *value.stride(), K, S, n_chunks, vcol_scale, H=H, CHUNK=chunk,
            SUMS=checks_on and bool({"qk_row", "pv_row"} & set(which)),
            num_warps=4 if not interp else 1)
        if checks_on:
            torch.cumsum(ksum, dim=2, out=ksum)
    qk_c, qk_allow, pv_c, pv_rc, pv_allow, a0, a1, a2, dmr_allow = _coefficients(S, H, _dt(query), bs.block_m,
                                                                              bs.block_n, chunk)
    pick = lambda x: dummy if x is None else x  # noqa: E731
    slices = [(0, redo.shape[0])] if redo is not None else [(o, min(B * N - o, _MAX_GRID_Y))
                                                           for o in range(0, B * N, _MAX_GRID_Y)]
    for offset, size in slices:
        grid = (size,) if redo is not None else (-(-T // bs.block_m), size)
        compiled = kern._forward[grid](
            query, key, value, out, pick(ksum), pick(vcol), pick(stats), pick(flags), pick(count), ft, fv,
            pick(redo), *query.stride(), *key.stride(), *value.stride(), *out.stride(),
            N, N // K, K, T, S, n_chunks, n_faults, B * N * T, offset, scale,
            qk_c, qk_allow, pv_c, pv_rc, pv_allow, a0, a1, a2, dmr_allow, 1.0 / vcol_scale,
            H=H, BLOCK_M=bs.block_m, BLOCK_N=bs.block_n, CHUNK=chunk, CAUSAL=is_causal,
            QK=checks_on and "qk_row" in which, DMR=checks_on and "softmax_dmr" in which,
            PV=checks_on and "pv_row" in which, INJECT=n_faults > 0, REDO_MODE=redo is not None, UPCAST=upcast,
            SIGNED=signed, REPLICA_FMA=bs.replica == "fma", num_warps=bs.num_warps, num_stages=bs.num_stages)
    return out, stats, flags, count, bs, compiled


@functools.lru_cache(maxsize=256)
def _coefficients(S: int, H: int, dtype: str, block_m: int, block_n: int, chunk: int) -> tuple[float, ...]:
    """The kernel's threshold coefficients (``tol.fused_*``), computed once per shape."""
    return (tol.fused_qk_coefficient(S, H, dtype, block_m, block_n, chunk), tol.underflow_allowance(4 * (S + 1) * (H + 1)),
            *tol.fused_pv_coefficients(S, H, dtype), *tol.fused_dmr_coefficients(S, block_n))


def _dt(x: Tensor) -> str:
    return str(x.dtype).removeprefix("torch.")


class _Attention(torch.autograd.Function):
    """The fused forward with the backward of plain attention (float32, not checked)."""

    @staticmethod
    def forward(ctx, query, key, value, out, scale, is_causal):
        ctx.save_for_backward(query, key, value)
        ctx.scale, ctx.is_causal = scale, is_causal
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from .sdpa import plain_attention_backward

        query, key, value = ctx.saved_tensors
        dq, dk, dv, _ = plain_attention_backward(query, key, value, None, ctx.is_causal, ctx.scale, grad_out)
        return dq, dk, dv, None, None, None


def run(query: Tensor, key: Tensor, value: Tensor, *, scheme: str, granularity: str, scale: float,
        is_causal: bool, on_fault: str = "report", plan: FaultPlan | None = None):
    """The fused path of ``attention``: inputs validated, :func:`check_supported` passed."""
    dev = query.device
    wanted = implementation_checks("triton", scheme)
    with torch.no_grad():
        q = faults.inject(query.detach(), "query", "BNTH", plan)
        k = faults.inject(key.detach(), "key", "BKSH", plan)
        v = faults.inject(value.detach(), "value", "BKSH", plan)
        glob = granularity == "global"
        out, stats, flags, count, bs, _ = forward(q, k, v, scale=scale, is_causal=is_causal,
                                                  checks_on=bool(wanted), plan=plan, signed=glob, which=wanted)
        if faults.targets_any(plan, ("query", "key", "value")):  # the kernels counted the corrupted inputs
            finite = torch.isfinite(query).all() & torch.isfinite(key).all() & torch.isfinite(value).all()
        else:
            finite = count[1] == 0
        results, rows = {}, None
        for name in wanted:
            i = _STAT_PLANES[name]
            if glob:
                results[name] = checks.verdict(stats[2 * i], stats[2 * i + 1], granularity,
                                               signed=(name != "softmax_dmr"))
                flag = results[name].flagged[..., None].expand(*results[name].flagged.shape, query.shape[2])
            else:
                results[name] = CheckResult(stats[2 * i], stats[2 * i + 1], flags[i])
                flag = flags[i]
            rows = flag if rows is None else rows | flag
        if not wanted:
            detected = torch.zeros((), dtype=torch.bool, device=dev)
        elif glob:
            detected = torch.stack([r.flagged.any() for r in results.values()]).any()
        else:
            detected = count[0] > 0
        corrected = torch.zeros((), dtype=torch.int32, device=dev)
        if on_fault == "correct" and rows is not None and bool(detected):
            B, N, T, _ = query.shape
            blk = torch.nn.functional.pad(rows, (0, -T % bs.block_m)).view(B * N, -1, bs.block_m).any(-1)
            bn, mb = torch.nonzero(blk, as_tuple=True)
            redo = torch.stack([mb, bn], dim=1).to(torch.int32).contiguous()
            forward(q, k, v, scale=scale, is_causal=is_causal, checks_on=False, blocks=bs, redo=redo, out=out)
            corrected += rows.sum(dtype=torch.int32)
        if on_fault == "nan" and rows is not None:
            out = out.masked_fill(rows[..., None], float("nan"))
    if torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value)):
        out = _Attention.apply(query, key, value, out, scale, is_causal)
    return out, make_report(detected=detected, checks=results, inputs_finite=finite, located={}, corrected=corrected)
