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
counters; its verdict names its ``jax.process_index()``.
"""

from __future__ import annotations

import jax

from ftattn_spec.monitoring import (Classification, Monitor as _Monitor, SiteVerdict, StepVerdict, Totals,
                                    tensorboard)

from . import counters

__all__ = ["Classification", "Monitor", "SiteVerdict", "StepVerdict", "Totals", "tensorboard"]


class _Local:
    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self, mine):
        return [{} for _ in range(self.rank)] + [mine]


class Monitor(_Monitor):
    """A monitor over this process's JAX counters (``ftattn_spec.monitoring.Monitor``)."""

    def __init__(self, *, on_step=()):
        rank = jax.process_index()
        super().__init__(read=counters.tally, reset=counters.reset, gather=_Local(rank) if rank else None,
                         rank=rank, on_step=on_step)
