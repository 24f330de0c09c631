"""What the PyTorch implementations share unchanged: the ``torch`` spelling of the spec's
array operations, and the verdict of a check."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ftattn_spec import tolerances as tol
from ftattn_spec.arrays import ArrayOps
from ftattn_spec.report import CheckResult

F32 = torch.float32


@functools.lru_cache(maxsize=16)
def ops(device) -> ArrayOps:
    """The spec's array operations on ``device``."""
    return ArrayOps(
        arange=lambda n: torch.arange(n, device=device),
        ones=lambda shape: torch.ones(shape, dtype=torch.bool, device=device),
        where=torch.where,
        isfinite=torch.isfinite,
        isnan=torch.isnan,
        take_last=lambda x, idx: x.gather(-1, idx[..., None])[..., 0],
        stack_last=lambda xs: torch.stack(xs, -1),
        int32=lambda x: x.to(torch.int32),
    )


def verdict(diff: Tensor, threshold: Tensor, granularity: str, signed: bool = True,
            ratio: bool = False) -> CheckResult:
    """A ``CheckResult`` from per-row (or per-column) differences and thresholds.

    ``ratio``: ``diff`` is already each row's residual in units of its bound (``softmax_exp``,
    threshold 1), and the global verdict is the worst row's.
    """
    if ratio and granularity == "global":
        residual, threshold = diff.amax(-1), threshold.amax(-1)
    elif granularity == "global":
        n = diff.shape[-1]
        residual = diff.sum(-1).abs() if signed else diff.sum(-1)
        threshold = tol.global_factor(n) * threshold.sum(-1)
    else:
        residual = diff.abs()
    residual, threshold = residual.to(F32), threshold.to(F32)
    return CheckResult(residual, threshold, ~((residual <= threshold) & threshold.isfinite()))


def reduce_to(ds: Tensor, bias: Tensor) -> Tensor:
    """The logits' gradient ``(B, N, T, S)`` summed over the axes ``bias`` broadcasts along, in
    ``bias``'s shape and dtype: the bias gradient of both backward passes."""
    pad = 4 - bias.ndim
    dims = tuple(i for i in range(4) if i < pad or bias.shape[i - pad] == 1 and ds.shape[i] != 1)
    if dims:
        ds = ds.sum(dim=dims, keepdim=True)
    return ds.reshape(bias.shape).to(bias.dtype)
