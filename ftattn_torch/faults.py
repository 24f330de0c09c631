"""Fault injection for the PyTorch backend: a ``FaultPlan`` applied eagerly.

Each fault that targets a site replaces one element of a copy of that tensor
(the caller's inputs and tensors saved for backward are never modified).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ftattn_spec.axes import transpose_perm
from ftattn_spec.faults import SITE_AXES, SITES, FaultPlan
from ftattn_spec.ring import RING_SITES

_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
        torch.bfloat16: torch.int16}


def corrupt(old: Tensor, kind: int, bit: int, value: float) -> Tensor:
    """``old`` (any shape) with ``bit`` flipped (kind 0), set to ``value`` (1), plus ``value``
    (2), or ``bit`` set to 1 (3) or 0 (4). Values are rounded through float32, as in JAX."""
    if kind in (0, 3, 4):
        width = old.element_size() * 8
        mask = 1 << bit
        if mask >= 1 << (width - 1):  # the sign bit, as a two's-complement constant
            mask -= 1 << width
        bits = old.view(_INT[old.dtype])
        return (bits ^ mask if kind == 0 else bits | mask if kind == 3 else bits & ~mask).view(old.dtype)
    v = torch.tensor([value], dtype=torch.float32, device=old.device).to(old.dtype)
    return v if kind == 1 else old + v


def targets(plan: FaultPlan | None, site: str, replica: int = 0) -> list[int]:
    if plan is None:
        return []
    code = SITES.index(site)
    return [f for f in range(len(plan)) if plan.site[f] == code and plan.replica[f] == replica]


def targets_any(plan: FaultPlan | None, sites) -> bool:
    """Whether the plan has a fault at any of ``sites``."""
    return plan is not None and any(SITES[int(c)] in sites for c in plan.site)


def inject(x: Tensor, site: str, layout: str, plan: FaultPlan | None, replica: int = 0) -> Tensor:
    """Apply the plan's faults that target ``site`` (and ``replica``) to a copy of ``x``.

    ``layout`` names ``x``'s axes in legend letters; indices in the plan are
    logical (``SITE_AXES[site]``).
    """
    hits = targets(plan, site, replica)
    if not hits:
        return x
    perm = transpose_perm(SITE_AXES[site], layout)
    x = x.clone()
    with torch.no_grad():
        for f in hits:
            idx = tuple(slice(None) if int(plan.index[f][p]) == -1 else int(plan.index[f][p]) for p in perm)
            x[idx] = corrupt(x[idx], int(plan.kind[f]), int(plan.bit[f]), float(plan.value[f]))
    return x


def inject_ring(x: Tensor, plan, me: int, step: int, site: str) -> Tensor:
    """A ring plan's (``ftattn_spec.ring.RingPlan``) faults at ``site`` of ``step`` on rank ``me``,
    applied to a copy of ``x``, whose axes are the plan's local index entries, in order."""
    if plan is None:
        return x
    code = RING_SITES.index(site)
    hits = [f for f in range(len(plan.site)) if plan.device[f] == me and plan.step[f] == step and plan.site[f] == code]
    if not hits:
        return x
    x = x.clone()
    for f in hits:
        idx = tuple(int(i) for i in plan.index[f][:x.ndim])
        x[idx] = corrupt(x[idx], int(plan.kind[f]), int(plan.bit[f]), float(plan.value[f]))
    return x


def core_plan(plan, me: int, step: int, sites) -> FaultPlan | None:
    """The faults of a ring plan (``ftattn_spec.ring.RingPlan``) that a block of step ``step`` on
    rank ``me`` injects itself, at one of ``sites`` (names of ``ftattn_spec.faults.SITES``), as a
    ``FaultPlan`` of block-local indices; None when there are none."""
    if plan is None:
        return None
    codes = [SITES.index(s) for s in sites]
    sel = (plan.device == me) & (plan.step == step) & np.isin(plan.core_site, codes)
    if not sel.any():
        return None
    return FaultPlan(plan.core_site[sel], plan.replica[sel], plan.index[sel], plan.kind[sel], plan.bit[sel],
                     plan.value[sel])
