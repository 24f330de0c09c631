"""Fault counters of the JAX backend: every protected call adds to them.

Per call site (a Flax module's path, a name given by the caller, or the file
and line of the call): detections and calls. A jitted function cannot update
state outside itself, so each call hands its verdict to the host with
``jax.debug.callback``. Measured (docs/benchmarks.md, "One run per preset"): the thread that
dispatches the call waits at the callback for the device, so each protected call costs one device
synchronisation (0.5 ms per call at short sequences on an H200 and on a CPU);
:func:`read` waits for the callbacks issued so far (``jax.effects_barrier``)
and returns the counts. Read them once per step, then skip, replay or stop
(docs/faults.md, "Counters").
"""

from __future__ import annotations

import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from ftattn_spec.policy import FaultWarning

_lock = threading.Lock()
_counts: dict[str, list[int]] = {}


def _add(site: str, warn: bool, detected) -> None:
    d = np.asarray(detected)
    n_det, n_calls = int(d.sum()), max(int(d.size), 1)
    with _lock:
        c = _counts.setdefault(site, [0, 0])
        c[0] += n_det
        c[1] += n_calls
    if warn and n_det:
        warnings.warn(f"ftattn (jax): a fault was detected in attention at {site} (nobody reads this call's "
                      f"report; policy 'warn')", FaultWarning, stacklevel=2)


def record(site: str, detected, warn: bool = False) -> None:
    """Count one call of ``site`` and its verdict (a bool scalar, traced or not)."""
    jax.debug.callback(lambda d: _add(site, warn, d), jnp.asarray(detected))


def read() -> dict[str, dict[str, int]]:
    """``{site: {"detected": n, "calls": n}}``, after the callbacks issued so far have run."""
    jax.effects_barrier()
    with _lock:
        return {s: {"detected": c[0], "calls": c[1]} for s, c in _counts.items()}


def detected() -> int:
    """Detections over every site."""
    return sum(s["detected"] for s in read().values())


def reset() -> None:
    """Zero every counter (after the callbacks issued so far)."""
    jax.effects_barrier()
    with _lock:
        _counts.clear()
