"""Fault injection inside the fused kernels: what both kernels share unchanged.

:func:`corrupt` applies one fault to a value of a tile in the logical units of
the unfused scheme; :func:`fault_rows` turns a plan into the Hopper kernel's
per-row table (the portable kernel reads the plan's rows directly).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

F32 = jnp.float32

#: Rows of the Hopper kernel's fault table: slot (scores, probs, probs replica, out) × field
#: (column, kind, bit, value)
FAULT_SLOTS = 4
FAULT_FIELDS = 4
SLOT_SCORES, SLOT_PROBS, SLOT_REPLICA, SLOT_OUT = range(FAULT_SLOTS)


def corrupt(x, kind, bit, value, unit):
    """``x`` (float32) with ``bit`` flipped (kind 0), set to ``value`` (1) or plus ``value`` (2), in
    the logical units ``x·unit``; ``kind``, ``bit`` (int32) and ``value`` are scalars or broadcast
    against ``x``."""
    logical = x * unit
    bits, mask = lax.bitcast_convert_type(logical, jnp.int32), jnp.left_shift(jnp.ones_like(bit), bit)
    changed = lax.bitcast_convert_type(
        jnp.where(kind == 3, bits | mask, jnp.where(kind == 4, bits & ~mask, bits ^ mask)), F32)
    return jnp.where(kind == 1, value, jnp.where(kind == 2, logical + value, changed)) / unit


def fault_rows(ft, fv, B: int, N: int, Tp: int):
    """The plan's ``(F·8,)`` int32 rows (site, replica, b, n, i, j, kind, bit) and ``(F,)``
    values as the kernel's per-row table ``(16, B, N, Tp)``. One fault per slot and row
    (the caller checks); input-site faults and padding rows (site −1) are dropped."""
    F = fv.shape[0]
    site, rep, b, n, i, j, kind, bit = (ft.reshape(F, 8)[:, x] for x in range(8))
    slot = jnp.where(site == 0, SLOT_SCORES, jnp.where((site == 1) & (rep == 0), SLOT_PROBS, jnp.where(
        (site == 1) & (rep == 1), SLOT_REPLICA, jnp.where(site == 2, SLOT_OUT, FAULT_SLOTS))))
    inside = (b >= 0) & (b < B) & (n >= 0) & (n < N) & (i >= 0) & (i < Tp)
    slot = jnp.where(inside, slot, FAULT_SLOTS)
    b, n, i = (jnp.clip(x, 0, hi - 1) for x, hi in ((b, B), (n, N), (i, Tp)))
    table = jnp.zeros((FAULT_SLOTS + 1, FAULT_FIELDS, B, N, Tp), F32).at[:, 0].set(-1.0)
    fields = jnp.stack([j.astype(F32), kind.astype(F32), bit.astype(F32), fv.astype(F32)], axis=1)  # F × 4
    table = table.at[slot, :, b, n, i].set(fields)
    return table[:FAULT_SLOTS].reshape(FAULT_SLOTS * FAULT_FIELDS, B, N, Tp)
