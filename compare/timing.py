"""Timing methods: the robust default, and the seed notebook's own two methods.

A *timer* measures one interval: ``start()`` returns a marker, ``stop(marker,
result)`` waits for ``result`` and returns milliseconds. Two implementations:
CUDA events for PyTorch on a GPU, and a host clock around a device sync for
everything else (JAX's ``block_until_ready``). Tests pass a fake one.

* :func:`robust`: warm-up calls first (compilation and allocator start-up
  excluded), then the median of ``reps`` timed calls, rotating input sets so
  that caches do not flatter small shapes; the spread (quartiles) is saved.
  PyTorch on a GPU times each call with CUDA events (device time).
* :func:`pipelined`: JAX's protocol. JAX has no public device timer, and a host
  clock around one call and its ``block_until_ready`` adds the dispatch and the
  sync's round trip to every call. So each repetition launches ``calls`` calls
  back to back and waits once: the device runs them one after another while the
  host dispatches ahead, and the time per call is the device's when the device is
  the bottleneck. The host's own dispatch time per call is measured too and
  saved (``dispatch_ms``): when it is near ``ms`` the call is host-bound.
* :func:`protocol`: which of the two a backend gets (every command uses it).
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
    return {"ms": statistics.median(times), "times_ms": times, "iqr_ms": quartiles(times), "method": "robust"}


def quartiles(times: Sequence[float]) -> list[float]:
    """``[first quartile, third quartile]`` of ``times`` (one value: itself twice)."""
    if len(times) < 2:
        return [float(times[0]), float(times[0])] if times else [float("nan")] * 2
    q = statistics.quantiles(times, n=4, method="inclusive")
    return [q[0], q[2]]


def pipelined(fn: Callable, inputs: Sequence[tuple], sync: Callable, *, warmup: int = 3, reps: int = 10,
              calls: int = 10, clock: Callable[[], float] = time.perf_counter) -> dict:
    """JAX's protocol (module docstring): ``warmup`` untimed calls, then ``reps`` repetitions of
    ``calls`` back-to-back calls (rotating ``inputs``) and one ``sync``; the median per call, its
    quartiles, and the median host time to dispatch one call (``dispatch_ms``)."""
    if reps < 1 or warmup < 0 or calls < 1 or not inputs:
        raise ValueError(f"reps >= 1, warmup >= 0, calls >= 1 and at least one input set expected, got "
                         f"reps={reps}, warmup={warmup}, calls={calls}, {len(inputs)} input sets")
    for i in range(warmup):
        sync(fn(*inputs[i % len(inputs)]))
    times, dispatch = [], []
    for r in range(reps):
        t0 = clock()
        out = None
        for c in range(calls):
            d0 = clock()
            out = fn(*inputs[(r * calls + c) % len(inputs)])
            dispatch.append((clock() - d0) * 1e3)
        sync(out)
        times.append((clock() - t0) * 1e3 / calls)
    return {"ms": statistics.median(times), "times_ms": times, "iqr_ms": quartiles(times),
            "dispatch_ms": statistics.median(dispatch), "calls_per_rep": calls, "method": "pipelined"}


def protocol(backend_name: str, on_gpu: bool) -> str:
    """The timing protocol every command uses for a framework: ``"cuda-events"`` (PyTorch on a
    GPU, :func:`robust` with :class:`CudaEventTimer`), ``"pipelined"`` (JAX anywhere), or
    ``"host"`` (PyTorch on a CPU: :func:`robust` with a host clock)."""
    if backend_name == "jax":
        return "pipelined"
    return "cuda-events" if on_gpu else "host"


def measure(fn: Callable, inputs: Sequence[tuple], *, backend_name: str, on_gpu: bool, sync: Callable,
            torch=None, warmup: int = 3, reps: int = 10) -> dict:
    """Time ``fn`` with its framework's protocol (:func:`protocol`); the result says which."""
    kind = protocol(backend_name, on_gpu)
    if kind == "pipelined":
        out = pipelined(fn, inputs, sync, warmup=warmup, reps=reps)
    else:
        timer = CudaEventTimer(torch) if kind == "cuda-events" else HostTimer(sync)
        out = robust(fn, inputs, timer, warmup=warmup, reps=reps)
    out["protocol"] = kind
    return out


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
