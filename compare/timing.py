"""Timing methods: the robust default, and the seed notebook's own two methods.

A *timer* measures one interval: ``start()`` returns a marker, ``stop(marker,
result)`` waits for ``result`` and returns milliseconds. Two implementations:
CUDA events for PyTorch on a GPU, and a host clock around a device sync for
everything else (JAX's ``block_until_ready``). Tests pass a fake one.

* :func:`robust`: warm-up calls first (compilation and allocator start-up
  excluded), then the median of ``reps`` timed calls, rotating input sets so
  that caches do not flatter small shapes.
* :func:`notebook`: the notebook's cells: no warm-up, ten calls between two
  events, the total divided by ten. The first call of a process pays start-up
  (the notebook measured 16.6 ms against 2.26 ms steady state).
* :func:`notebook_loop_order`: the notebook's "change the loop order" cell:
  the outer loop runs the iterations, the inner one the sequence lengths, with
  fresh inputs and one event pair per call; the mean per length.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Protocol, Sequence


class Timer(Protocol):
    def start(self): ...

    def stop(self, marker, result) -> float: ...

    def sync(self, result) -> None: ...


class HostTimer:
    """Host clock around a device sync (``sync(result)`` blocks until it is ready)."""

    def __init__(self, sync: Callable, clock: Callable[[], float] = time.perf_counter):
        self.sync, self.clock = sync, clock

    def start(self):
        return self.clock()

    def stop(self, marker, result) -> float:
        self.sync(result)
        return (self.clock() - marker) * 1e3


class CudaEventTimer:
    """``torch.cuda.Event`` pairs: device time between two points of the stream."""

    def __init__(self, torch):
        self.torch = torch

    def sync(self, result) -> None:
        self.torch.cuda.synchronize()

    def start(self):
        ev = self.torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def stop(self, marker, result) -> float:
        end = self.torch.cuda.Event(enable_timing=True)
        end.record()
        self.torch.cuda.synchronize()
        return float(marker.elapsed_time(end))


def timer_for(backend) -> Timer:
    """The timer a ``compare.backends`` adapter should use."""
    if backend.name == "torch" and backend.device.type == "cuda":
        return CudaEventTimer(backend.torch)
    return HostTimer(backend.sync)


def robust(fn: Callable, inputs: Sequence[tuple], timer: Timer, *, warmup: int = 3, reps: int = 10) -> dict:
    """Median of ``reps`` timed calls after ``warmup`` untimed ones, rotating ``inputs``."""
    if reps < 1 or warmup < 0 or not inputs:
        raise ValueError(f"reps >= 1, warmup >= 0 and at least one input set expected, got reps={reps}, "
                         f"warmup={warmup}, {len(inputs)} input sets")
    for i in range(warmup):
        timer.sync(fn(*inputs[i % len(inputs)]))
    times = []
    for i in range(reps):
        m = timer.start()
        times.append(timer.stop(m, fn(*inputs[i % len(inputs)])))
    return {"ms": statistics.median(times), "times_ms": times, "method": "robust"}


def notebook(fn: Callable, inputs: Sequence[tuple], timer: Timer, *, iters: int = 10) -> dict:
    """The notebook's cells: ``iters`` calls on one input set between two events, no warm-up."""
    m = timer.start()
    r = None
    for _ in range(iters):
        r = fn(*inputs[0])
    total = timer.stop(m, r)
    return {"ms": total / iters, "total_ms": total, "method": "notebook"}


def notebook_loop_order(fns: dict, make_inputs: Callable, timer: Timer, *, iters: int = 10) -> dict:
    """The "change the loop order" cell: for each iteration, for each key of ``fns``
    (a sequence length), fresh inputs ``make_inputs(key)`` and one timed call.
    Returns ``{key: mean ms}``."""
    totals = {key: 0.0 for key in fns}
    for _ in range(iters):
        for key, fn in fns.items():
            args = make_inputs(key)
            m = timer.start()
            totals[key] += timer.stop(m, fn(*args))
    return {key: t / iters for key, t in totals.items()}
