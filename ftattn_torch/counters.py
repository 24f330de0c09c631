"""Fault counters of the PyTorch backend: every protected call adds to them.

Per call site (a layer's ``layer_idx`` for Hugging Face models, a name given by
the caller, or the file and line of the call) a tally
(``ftattn_spec.tally``): calls, detections, non-finite inputs, and where the
first detection flagged (check, batch, head, row). A call launches nothing and
waits for nothing: it keeps a reference to its verdict (a bool scalar on the
device) and counts itself on the host; every ``FOLD`` calls a site's verdicts
are summed on the device into one int64 tensor (two launches). For the location
it keeps references to the ``flagged`` arrays of the site's last ``KEEP`` calls
(bool, ``B·N·T`` bytes per check); :func:`tally` reads them only for a site that
detected. :func:`read` and :func:`tally` bring the sums to the host (call them
once per step; ``ftattn_torch.monitor`` does); a training loop reads them, then
skips, replays or stops (docs/faults.md, "Counters and the fault policy").
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import threading

import torch

from ftattn_spec import tally as spec_tally

from .common import ops

#: verdicts kept per site and device before they are summed on the device
FOLD = 256
#: calls per site whose flagged arrays are kept between two reads, to locate a detection
KEEP = 4

_lock = threading.Lock()
_sites: dict[tuple[str, str], "_Site"] = {}
#: the (batch, head) offset of the calls counted now: a rank's block of a DTensor call
_offset: contextvars.ContextVar[tuple[int, int]] = contextvars.ContextVar("ftattn_counters_offset", default=(0, 0))


@contextlib.contextmanager
def index_offset(batch: int, head: int):
    """Count the calls made inside at global indices: their located batch and head shifted by
    ``batch`` and ``head`` (a rank's first batch and query head of a call split over a mesh)."""
    token = _offset.set((int(batch), int(head)))
    try:
        yield
    finally:
        _offset.reset(token)


class _Site:
    __slots__ = ("pending", "folded", "calls", "kept", "first", "finite", "nonfinite")

    def __init__(self):
        self.pending: list[torch.Tensor] = []
        self.folded: torch.Tensor | None = None
        self.calls = 0
        self.kept: collections.deque = collections.deque(maxlen=KEEP)
        self.first: list[int] | None = None  # the location row fields, once one is found
        self.finite: list[torch.Tensor] = []  # the calls' inputs_finite, summed with the verdicts
        self.nonfinite: torch.Tensor | None = None

    def fold(self) -> None:
        if self.pending:
            total = torch.stack(self.pending).sum(dtype=torch.int64)
            self.folded = total if self.folded is None else self.folded + total
            self.pending = []
        if self.finite:
            bad = (~torch.stack(self.finite)).sum(dtype=torch.int64)
            self.nonfinite = bad if self.nonfinite is None else self.nonfinite + bad
            self.finite = []


def record(site: str, report) -> None:
    """Count one call of ``site`` and its verdict: its ``Report``, or a bool scalar tensor."""
    if torch.compiler.is_compiling():  # a traced graph cannot update host-held state; see docs
        return
    detected = getattr(report, "detected", report)
    key = (site, str(detected.device))
    with _lock:
        s = _sites.get(key)
        if s is None:
            s = _sites[key] = _Site()
        s.pending.append(detected.detach().reshape(()))
        s.calls += 1
        if hasattr(report, "checks"):
            s.finite.append(report.inputs_finite.detach().reshape(()))
            if s.first is None:
                s.kept.append((report._replace(checks={n: c._replace(residual=None, threshold=None)
                                                       for n, c in report.checks.items()},
                                               located={}, corrected=None), _offset.get()))
        if len(s.pending) >= FOLD:
            s.fold()


def _locate(s: _Site) -> None:
    """Set ``s.first`` from the first detecting call among the kept ones (reads their verdicts)."""
    if s.first is not None or not s.kept:
        return
    flags = torch.stack([r.detected.reshape(()) for r, _ in s.kept]).tolist()
    for (r, offset), hit in zip(s.kept, flags):
        if hit:
            row = spec_tally.encode(r, ops(r.detected.device)).tolist()
            if row[3] > 0:
                s.first = row[3:]
                for i, o in enumerate(offset):  # batch and head: global in a call split over a mesh
                    if s.first[1 + i] >= 0:
                        s.first[1 + i] += o
                break
    s.kept.clear()


def tally() -> dict[str, spec_tally.SiteTally]:
    """Every site's :class:`ftattn_spec.tally.SiteTally`, summed over devices (waits for the
    device). A location is found among each site's last ``KEEP`` calls before the read."""
    rows: dict[str, list[int]] = {}
    with _lock:
        for (site, _), s in _sites.items():
            s.fold()
            detected = 0 if s.folded is None else int(s.folded)
            if detected:
                _locate(s)
            else:
                s.kept.clear()
            where = s.first if s.first is not None else [0, -1, -1, -1]
            row = [s.calls, detected, 0 if s.nonfinite is None else int(s.nonfinite), *where]
            rows[site] = spec_tally.merge_host(rows.get(site, spec_tally.zero()), row)
    return {site: spec_tally.decode(r) for site, r in rows.items()}


def read() -> dict[str, dict[str, int]]:
    """``{site: {"detected": n, "calls": n}}`` summed over devices (waits for the device)."""
    return {s: {"detected": t.detected, "calls": t.calls} for s, t in tally().items()}


def detected() -> int:
    """Detections over every site (reads the counters: once per step)."""
    return sum(s["detected"] for s in read().values())


def reset() -> None:
    """Zero every counter."""
    with _lock:
        _sites.clear()
