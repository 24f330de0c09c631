"""The fault monitor of the PyTorch backend: one verdict per training step, across ranks.

::

    from ftattn_torch import monitor
    mon = monitor.Monitor(on_step=monitor.tensorboard(SummaryWriter()))   # on_step optional
    for batch in data:
        loss = model(batch).loss; loss.backward()
        verdict = mon.step()          # one read of the counters, one collective when distributed
        if verdict.detected:          # the same on every rank
            optimizer.zero_grad()     # skip the step everywhere
            print(verdict.summary())  # rank, layer, check, (b, n, row)
            kind = mon.replay(lambda device: model(batch.to(device or "cuda")).loss.backward()).kind
            continue
        optimizer.step(); optimizer.zero_grad()

Every protected call adds its verdict to ``ftattn_torch.counters`` without a
host synchronisation. Sites are Hugging Face layers (``"layer <layer_idx>"``),
the ``site`` argument, or the caller's file and line. With
``torch.distributed`` initialized, :meth:`step` gathers every rank's tallies in
one ``all_gather_object`` (a few integers per site) over ``group`` (default:
the world), so every rank gets the same verdict.
"""

from __future__ import annotations

import torch.distributed as dist

from ftattn_spec.monitoring import (Classification, Monitor as _Monitor, SiteVerdict, StepVerdict, Totals,
                                    tensorboard)

from . import counters

__all__ = ["Classification", "Monitor", "SiteVerdict", "StepVerdict", "Totals", "tensorboard"]


class _Gather:
    def __init__(self, group):
        self.group = group

    def __call__(self, mine):
        parts = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(parts, mine, group=self.group)
        return parts


class Monitor(_Monitor):
    """A monitor over this process's PyTorch counters (``ftattn_spec.monitoring.Monitor``); with
    ``torch.distributed`` initialized, over every rank of ``group``."""

    def __init__(self, *, group=None, on_step=()):
        distributed = dist.is_available() and dist.is_initialized()
        if group is not None and not distributed:
            raise ValueError("group: torch.distributed is not initialized (call init_process_group first), "
                             f"got group={group!r}")
        rank = dist.get_rank(group) if distributed else 0
        super().__init__(read=counters.tally, reset=counters.reset,
                         gather=_Gather(group) if distributed else None, rank=rank, on_step=on_step)
