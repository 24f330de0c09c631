"""Device-side fault counters of the PyTorch backend: every protected call adds to them.

Per call site (a layer's ``layer_idx`` for Hugging Face models, a name given by
the caller, or the file and line of the call) and device: int64 tensors of
detections and calls, added to on the device, so a call waits for nothing.
:func:`read` brings them to the host once (call it once per step); a training
loop reads them, then skips, replays or stops (docs/faults.md, "Counters").
"""

from __future__ import annotations

import threading

import torch

_lock = threading.Lock()
_counts: dict[tuple[str, str], torch.Tensor] = {}


def record(site: str, detected: torch.Tensor) -> None:
    """Add one call and its verdict (a bool scalar tensor) to the counters of ``site``."""
    if torch.compiler.is_compiling():  # a traced graph cannot update host-held state; see docs
        return
    key = (site, str(detected.device))
    with _lock:
        c = _counts.get(key)
        if c is None:
            c = _counts[key] = torch.zeros(2, dtype=torch.int64, device=detected.device)
    c[0] += detected.to(torch.int64)
    c[1] += 1


def read() -> dict[str, dict[str, int]]:
    """``{site: {"detected": n, "calls": n}}`` summed over devices (one transfer per device in use)."""
    out: dict[str, dict[str, int]] = {}
    with _lock:
        items = list(_counts.items())
    for (site, _), c in items:
        d, n = (int(x) for x in c.tolist())
        s = out.setdefault(site, {"detected": 0, "calls": 0})
        s["detected"] += d
        s["calls"] += n
    return out


def detected() -> int:
    """Detections over every site (reads the counters: once per step)."""
    return sum(s["detected"] for s in read().values())


def reset() -> None:
    """Zero every counter."""
    with _lock:
        _counts.clear()
