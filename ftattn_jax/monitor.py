"""The fault monitor of the JAX backend: one verdict per training step.

::

    from ftattn_jax import monitor
    mon = monitor.Monitor(on_step=monitor.tensorboard(writer))   # on_step optional
    for batch in data:
        state, loss = train_step(state, batch)   # jitted; every ftattn call adds to the counters
        verdict = mon.step()                     # one read of the counters
        if verdict.detected:
            print(verdict.summary())             # site (layer), check, (b, n, row)
            kind = mon.replay(lambda device: loss_fn(state.params, batch)).kind

Every protected call adds its verdict to ``ftattn_jax.counters`` on the device
(with no host synchronisation per call in a single-device process; see that
module for when a call falls back to a callback). Sites are Flax module paths
(linen), the ``site`` argument, or the caller's file and line. In a
multi-controller job (``jax.process_count() > 1``) each process reads its own
counters, and :meth:`Monitor.step` gathers every process's tallies (two
``multihost_utils.process_allgather`` of a few bytes per site), so every process
gets the same verdict, naming the process (``jax.process_index()``) as its rank.
"""

from __future__ import annotations

import json

import jax
import numpy as np

from ftattn_spec.monitoring import (Classification, Monitor as _Monitor, SiteVerdict, StepVerdict, Totals,
                                    tensorboard)

from ftattn_spec import tally
from ftattn_spec.schemes import ANY_CHECK_ORIENTATION

from . import counters
from .common import OPS

__all__ = ["Classification", "Monitor", "SiteVerdict", "StepVerdict", "Totals", "devices_of", "tensorboard"]


def _gather_processes(mine) -> list:
    """Every process's tallies, in process order: the tallies as JSON bytes, their lengths
    all-gathered, then the bytes padded to the longest (the collectives of a multi-controller
    job: on CPUs, ``jax_cpu_collectives_implementation="gloo"``)."""
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(tally.to_rows(mine)).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([blob.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:blob.size] = blob
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [tally.from_rows(json.loads(bytes(every[i, :sizes[i]]).decode())) for i in range(len(sizes))]


class Monitor(_Monitor):
    """A monitor over this process's JAX counters (``ftattn_spec.monitoring.Monitor``); in a
    multi-controller job, over every process's (one gather per step)."""

    def __init__(self, *, on_step=()):
        many = jax.process_count() > 1
        super().__init__(read=counters.tally, reset=counters.reset, gather=_gather_processes if many else None,
                         rank=jax.process_index(), on_step=on_step)

    def replay(self, fn, other=None) -> Classification:
        """As ``ftattn_spec.monitoring.Monitor.replay``. The replay on ``other`` counts through host
        callbacks (``counters.use_device_tallies(False)``): a traced call's counters otherwise live
        on the default device (or the mesh's), and a function jitted for ``other`` could not close
        over them. JAX's caches are cleared before and after that replay, so that ``fn``'s jitted
        functions are traced again for it; the next call of each recompiles once."""
        if other is None or not callable(fn):
            return super().replay(fn, other)

        def where(device):
            if device is None:
                return fn(None)
            previous = counters.use_device_tallies(False)
            jax.clear_caches()
            try:
                return fn(device)
            finally:
                counters.use_device_tallies(previous)
                jax.clear_caches()

        return super().replay(where, other)


def devices_of(where, sharding, q_shape) -> list:
    """The devices holding the query rows a detection names: ``where`` is a
    ``ftattn_spec.tally.Where`` (``SiteTally.first``, ``SiteVerdict.first[rank]``) or a
    ``Report`` (its first flagged element), ``sharding`` the query's (``q.sharding``, layout
    ``(B, T, N, H)``), ``q_shape`` its shape. A row check's ``(b, n, row)`` is query ``[b, row, n]``;
    a column check's ``(b, n, ·)`` is head ``n`` of batch ``b`` (every row). Empty when nothing is
    located."""
    if hasattr(where, "checks"):
        where = tally.decode(jax.device_get(tally.encode(where, OPS))).first
    if where is None or where.check is None or len(where.index) < 2:
        return []
    b, n = where.index[:2]
    row = where.index[2] if len(where.index) == 3 and ANY_CHECK_ORIENTATION[where.check] == "row" else None
    found = []
    for device, idx in sharding.devices_indices_map(tuple(q_shape)).items():
        bs, ts, ns = idx[0], idx[1], idx[2]
        if _within(b, bs, q_shape[0]) and _within(n, ns, q_shape[2]) and (row is None or _within(row, ts, q_shape[1])):
            found.append(device)
    return sorted(found, key=lambda d: d.id)


def _within(i: int, s: slice, size: int) -> bool:
    start, stop, step = s.indices(size)
    return start <= i < stop and (i - start) % step == 0
