"""Fault counters of the PyTorch backend: every protected call adds to them.

Per call site (a layer's ``layer_idx`` for Hugging Face models, a name given by
the caller, or the file and line of the call): detections and calls. A call
launches nothing and waits for nothing: it keeps a reference to its verdict
(a bool scalar on the device) and counts itself on the host; every
``FOLD`` calls a site's verdicts are summed on the device into one int64
tensor (two launches). :func:`read` brings the sums to the host (call it once
per step); a training loop reads them, then skips, replays or stops
(docs/faults.md, "Counters and the fault policy").
"""

from __future__ import annotations

import threading

import torch

#: verdicts kept per site and device before they are summed on the device
FOLD = 256

_lock = threading.Lock()
_sites: dict[tuple[str, str], "_Site"] = {}


class _Site:
    __slots__ = ("pending", "folded", "calls")

    def __init__(self):
        self.pending: list[torch.Tensor] = []
        self.folded: torch.Tensor | None = None
        self.calls = 0

    def fold(self) -> None:
        if self.pending:
            total = torch.stack(self.pending).sum(dtype=torch.int64)
            self.folded = total if self.folded is None else self.folded + total
            self.pending = []


def record(site: str, detected: torch.Tensor) -> None:
    """Count one call of ``site`` and its verdict (a bool scalar tensor)."""
    if torch.compiler.is_compiling():  # a traced graph cannot update host-held state; see docs
        return
    key = (site, str(detected.device))
    with _lock:
        s = _sites.get(key)
        if s is None:
            s = _sites[key] = _Site()
        s.pending.append(detected.detach().reshape(()))
        s.calls += 1
        if len(s.pending) >= FOLD:
            s.fold()


def read() -> dict[str, dict[str, int]]:
    """``{site: {"detected": n, "calls": n}}`` summed over devices (waits for the device)."""
    out: dict[str, dict[str, int]] = {}
    with _lock:
        for (site, _), s in _sites.items():
            s.fold()
            c = out.setdefault(site, {"detected": 0, "calls": 0})
            c["detected"] += 0 if s.folded is None else int(s.folded)
            c["calls"] += s.calls
    return out


def detected() -> int:
    """Detections over every site (reads the counters: once per step)."""
    return sum(s["detected"] for s in read().values())


def reset() -> None:
    """Zero every counter."""
    with _lock:
        _sites.clear()
