"""A ring plan's faults in JAX (``ftattn_spec.ring.RingPlan`` as arrays): what the ring code injects
itself (:func:`inject`) and what a block's kernel or core injects (:func:`core_plan`), by device
(``lax.axis_index``, traced) and step (static)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ftattn_spec import faults as spec_faults
from ftattn_spec import ring

from . import faults
from .common import F32

_RING_CODE = {name: i for i, name in enumerate(ring.RING_SITES)}


def inject(x, rp, me, step: int, site: str, axes_of_x: tuple[int, ...]):
    """Apply the ring plan's faults at ``site`` of ``step`` on this device to ``x``, whose axes
    ``axes_of_x`` are the positions of the plan's local index entries."""
    if rp is None:
        return x
    for f in range(rp.site.shape[0]):
        hit = (rp.device[f] == me) & (rp.step[f] == step) & (rp.site[f] == _RING_CODE[site])
        for axis, p in enumerate(axes_of_x):
            hit = hit & (lax.broadcasted_iota(jnp.int32, x.shape, axis) == rp.index[f, p])
        x = jnp.where(hit, faults.corrupt(x, rp.kind[f], rp.bit[f], rp.value[f]), x)
    return x


def core_plan(rp, me, step: int, sites: tuple[str, ...]):
    """The ``DevicePlan`` a block of ``step`` on this device injects itself: the plan's faults at
    one of ``sites`` (names of ``ftattn_spec.faults.SITES``); the others get site −1 (never hit)."""
    if rp is None:
        return None
    on = (rp.device == me) & (rp.step == step) & (rp.core_site >= 0)
    on = on & jnp.isin(rp.core_site, jnp.asarray([spec_faults.SITES.index(s) for s in sites], jnp.int32))
    return faults.DevicePlan(jnp.where(on, rp.core_site, -1), rp.replica, rp.index, rp.kind, rp.bit,
                             rp.value.astype(F32))


__all__ = ["inject", "core_plan"]
