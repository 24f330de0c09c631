"""One verdict across the ranks of a ``torch.distributed`` job.

When heads or batch are split across ranks, each rank's ``attention`` call
returns a :class:`~ftattn_spec.Report` for its own part. :func:`global_verdict`
gathers what every rank found in one collective (an ``all_gather`` of a few
integers per check: gloo on CPUs, NCCL on GPUs) and returns the same
:class:`GlobalVerdict` on every rank: whether any rank detected a fault, which
ranks and checks did, and where on each rank the first flagged element is, so a
training loop can skip the step on every rank at once and name the device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from ftattn_spec import CHECKS, Report
from ftattn_spec.tally import Where, first_flagged

from .common import ops
from .ring import ring_attention  # noqa: F401  (public: ftattn_torch.distributed.ring_attention)

#: per check: flagged (0/1), run (0/1), then up to three indices of its first flagged element
_PER_CHECK = 5
#: detected, inputs_finite, then the checks
_LEN = 2 + _PER_CHECK * len(CHECKS)


class GlobalVerdict(NamedTuple):
    """What the ranks of a group found, the same on every rank (ranks are ranks of ``group``).

    ``detected``: any rank's report detected something (a check flagged, or an input was not
    finite). ``ranks``: the ranks whose report did. ``checks``: check name → the ranks where it
    flagged (every check some rank ran). ``inputs_finite``: every rank's inputs were finite.
    ``first``: rank → ``Where`` (``ftattn_spec.tally.Where``) of its first flagged element (in ``CHECKS`` order), for
    each rank a check flagged on.
    """

    detected: bool
    ranks: tuple[int, ...]
    checks: dict[str, tuple[int, ...]]
    inputs_finite: bool
    first: dict[int, Where]


def _encode(report: Report, device) -> torch.Tensor:
    """The report as ``_LEN`` int64 on ``device``, computed there: nothing is read on the host."""
    def flag(x):
        return torch.as_tensor(x, device=device).reshape(()).to(torch.int64)

    row = [flag(report.detected), flag(report.inputs_finite)]
    for name in CHECKS:
        c = report.checks.get(name)
        if c is None:
            row.append(torch.tensor([0, 0, -1, -1, -1], dtype=torch.int64, device=device))
            continue
        index, hit = first_flagged(torch.as_tensor(c.flagged, device=device), ops(device))
        hit = hit.to(torch.int64)
        index = [torch.where(hit > 0, i.to(torch.int64), -1) for i in index]
        index += [torch.tensor(-1, dtype=torch.int64, device=device)] * (3 - len(index))
        row.append(torch.stack([hit, torch.ones_like(hit), *index]))
    return torch.cat([torch.stack(row[:2]), *row[2:]])


def global_verdict(report: Report, group=None) -> GlobalVerdict:
    """Gather every rank's ``report`` of one call (or step) into a :class:`GlobalVerdict`.

    A collective: every rank of ``group`` (default: the world) must call it, in the same order as
    its other collectives. The report is encoded on the device; the gathered verdict is read on the
    host once (one device synchronisation).
    """
    if not isinstance(report, Report):
        raise TypeError(f"report: expected an ftattn Report (the second value attention returns), "
                        f"got {type(report).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialized (call torch.distributed.init_process_group "
                         "first), got no process group")
    nccl = dist.get_backend(group) == "nccl"
    mine = _encode(report, torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu"))
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    rows = torch.stack(parts).cpu().tolist()
    checks, first = {}, {}
    for i, name in enumerate(CHECKS):
        at = 2 + _PER_CHECK * i
        if any(r[at + 1] for r in rows):
            checks[name] = tuple(rank for rank, r in enumerate(rows) if r[at])
        for rank, r in enumerate(rows):
            if r[at] and rank not in first:
                first[rank] = Where(name, tuple(x for x in r[at + 2:at + 5] if x >= 0))
    return GlobalVerdict(detected=any(r[0] for r in rows), ranks=tuple(rank for rank, r in enumerate(rows) if r[0]),
                         checks=checks, inputs_finite=all(r[1] for r in rows), first=first)
