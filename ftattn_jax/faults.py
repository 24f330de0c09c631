"""Fault injection for the JAX backend: a ``FaultPlan`` as traced data.

Every field of the plan (site, index, bit, value, kind) is a traced array, so
one compiled function serves every fault of the same count; only the number
of faults is static. At each site, each fault of the plan becomes an elementwise
select, ``x = where(fault targets this site and element, corrupted x, x)``: no
gather, so under ``jax.jit`` an ``x`` sharded over devices stays sharded.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from ftattn_spec.axes import transpose_perm
from ftattn_spec.faults import SITE_AXES, SITES, FaultPlan


class DevicePlan(NamedTuple):
    """A ``FaultPlan`` as JAX arrays (a pytree, passed to the jitted pipeline)."""

    site: Array
    replica: Array
    index: Array
    kind: Array
    bit: Array
    value: Array


def to_device(plan: FaultPlan | None) -> DevicePlan | None:
    if plan is None:
        return None
    return DevicePlan(jnp.asarray(plan.site), jnp.asarray(plan.replica), jnp.asarray(plan.index),
                      jnp.asarray(plan.kind), jnp.asarray(plan.bit), jnp.asarray(plan.value, jnp.float32))


def _uint(dtype) -> type:  # the scalar type (jnp.uint16), not a dtype instance
    return {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[jnp.dtype(dtype).itemsize]


def corrupt(old: Array, kind: Array, bit: Array, value: Array) -> Array:
    """``old`` (any shape) with ``bit`` flipped (kind 0), set to ``value`` (1), plus ``value`` (2),
    or ``bit`` set to 1 (3) or 0 (4)."""
    ut = _uint(old.dtype)
    bits, mask = lax.bitcast_convert_type(old, ut), jnp.left_shift(jnp.ones((), ut), bit.astype(ut))
    pattern = jnp.where(kind == 3, bits | mask, jnp.where(kind == 4, bits & ~mask, bits ^ mask))
    changed = lax.bitcast_convert_type(pattern, old.dtype)
    v = value.astype(old.dtype)
    return jnp.where(kind == 1, v, jnp.where(kind == 2, old + v, changed))


def inject(x: Array, site: str, layout: str, plan: DevicePlan | None, replica: int = 0) -> Array:
    """Apply the plan's faults that target ``site`` (and ``replica``) to ``x``.

    ``layout`` names ``x``'s axes in legend letters (for example ``"BTNH"``);
    the plan's indices are logical (``SITE_AXES[site]``).
    """
    if plan is None:
        return x
    code = SITES.index(site)
    perm = transpose_perm(SITE_AXES[site], layout)
    for f in range(plan.site.shape[0]):
        hit = (plan.site[f] == code) & (plan.replica[f] == replica)
        for axis, p in enumerate(perm):  # an elementwise mask: an array sharded over devices stays sharded
            at = plan.index[f, p]  # -1: every position (a stuck-at fault's wildcard)
            hit = hit & ((at == -1) | (lax.broadcasted_iota(jnp.int32, x.shape, axis) == at))
        x = jnp.where(hit, corrupt(x, plan.kind[f], plan.bit[f], plan.value[f]), x)
    return x
