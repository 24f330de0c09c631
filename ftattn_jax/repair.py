"""Localization and repair for the JAX backend (``on_fault="correct"`` and ``"nan"``).

A GEMM with a row and a column checksum locates a single bad element: one
flagged row and at most one flagged column (or the reverse) name a candidate,
the most suspicious one on the unflagged axis when only one axis flagged. The
candidate is accepted only if replacing it by a recomputed value (one dot
product) would make both checks pass, i.e. the checks are re-evaluated at that
row and column. Everything is branch-free arrays of shape ``B N``, so it runs
under ``jax.jit`` and ``jax.vmap``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


class Located(NamedTuple):
    """Per (batch, head): the located element's row ``i`` and column ``j``, whether
    the location is ``ok``, and the element's recomputed ``value``."""

    i: Int[Array, "B N"]
    j: Int[Array, "B N"]
    ok: Bool[Array, "B N"]
    value: Float[Array, "B N"]

    def indices(self) -> Int[Array, "B N 2"]:
        """``(row, column)`` per head, ``-1`` where nothing was located."""
        return jnp.where(self.ok[..., None], jnp.stack([self.i, self.j], -1), -1).astype(jnp.int32)


def flags(diff: Array, thr: Array) -> Array:
    """Vector flags, as in ``checks.verdict``: a NaN or an infinite threshold fails closed."""
    return ~((jnp.abs(diff) <= thr) & jnp.isfinite(thr))


def _most_suspicious(diff: Float[Array, "B N R"], thr: Float[Array, "B N R"]) -> Int[Array, "B N"]:
    """Index of the largest ``|diff| / thr``; a non-finite residual or threshold
    ranks highest (a fault that overflowed a magnitude makes its own threshold
    infinite and its ratio 0, which must not make it the least suspicious)."""
    ratio = jnp.abs(diff) / thr
    broken = ~(jnp.isfinite(diff) & jnp.isfinite(thr))
    return jnp.argmax(jnp.where(broken | jnp.isnan(ratio), jnp.inf, ratio), axis=-1)


def _passes_after(d, thr, coef, delta, stored, ref):
    """Would a check with difference ``d`` and threshold ``thr`` pass once the
    element moves by ``-delta`` (``delta = stored - ref``)?

    ``d − delta`` cancels when the fault is large, so the float32 sums that
    produced ``d`` carry an extra rounding of up to ``coef·|delta|``: the check's
    own coefficient applied to the corrupted element's magnitude. A non-finite
    ``d`` passes when the stored element is the non-finite one; a finite ``d``
    never passes with a non-finite ``delta``. A non-finite threshold never
    passes: its magnitude was computed from corrupted data (a fault upstream of
    this GEMM), so no single element of the output explains it.
    """
    dz = jnp.where(jnp.isfinite(delta), delta, 0.0)
    ok = (jnp.abs(d - dz) <= thr + coef * jnp.abs(dz)) & jnp.isfinite(delta)
    ok = jnp.where(jnp.isfinite(d), ok, ~jnp.isfinite(stored) & jnp.isfinite(ref))
    return ok & jnp.isfinite(thr)


def locate(row, col, coefs, stored_fn, ref_fn) -> Located:
    """Locate single bad elements of one GEMM output.

    ``row = (diff, thr)`` is ``B N R`` and ``col = (diff, thr)`` is ``B N C``
    (vector granularity); ``coefs`` are the two checks' threshold coefficients.
    ``stored_fn(i, j)`` gathers the stored elements and ``ref_fn(i, j)``
    recomputes them, both ``B N``.
    """
    fr, fc = flags(*row), flags(*col)
    nr, nc = fr.sum(-1), fc.sum(-1)
    i, j = _most_suspicious(*row), _most_suspicious(*col)
    candidate = (nr <= 1) & (nc <= 1) & (nr + nc >= 1)
    stored, ref = stored_fn(i, j), ref_fn(i, j)
    delta = stored - ref
    pick = lambda a, k: jnp.take_along_axis(a, k[..., None], axis=-1)[..., 0]  # noqa: E731
    ok_row = _passes_after(pick(row[0], i), pick(row[1], i), coefs[0], delta, stored, ref)
    ok_col = _passes_after(pick(col[0], j), pick(col[1], j), coefs[1], delta, stored, ref)
    return Located(i, j, candidate & ok_row & ok_col, ref)


def affected_rows(row_flags: Bool[Array, "B N R"] | None, col_flags: Bool[Array, "B N C"] | None,
                  n_rows: int, located: Located | None) -> Bool[Array, "B N R"] | None:
    """Rows a stage's flags implicate: the flagged rows; every row of a head where
    only a column check flagged (the row is unknown); the located row alone
    where an element was located. ``None`` when the stage has no check.

    At ``granularity="global"`` callers pass the per-head flags broadcast to rows.
    """
    if row_flags is None and col_flags is None:
        return None
    rows = row_flags if row_flags is not None else False
    if col_flags is not None:
        head = jnp.any(col_flags, -1)
        if row_flags is not None:
            head = head & ~jnp.any(row_flags, -1)
        rows = rows | head[..., None]
    rows = jnp.broadcast_to(rows, (*(row_flags if row_flags is not None else col_flags).shape[:2], n_rows))
    if located is not None:
        onehot = jnp.arange(n_rows) == located.i[..., None]
        rows = jnp.where(located.ok[..., None], onehot, rows)
    return rows
