"""Localization of a single bad element of a GEMM output, framework-free.

A GEMM with a row and a column checksum locates a single bad element: one
flagged row and at most one flagged column (or the reverse) name a candidate,
the most suspicious one on the unflagged axis when only one axis flagged. The
candidate is accepted only if replacing it by a recomputed value (one dot
product) would make both checks pass, i.e. the checks are re-evaluated at that
row and column. Everything is branch-free arrays of shape ``B N`` (so it runs
under ``jax.jit`` and ``jax.vmap``); a backend supplies its
:class:`~ftattn_spec.arrays.ArrayOps`. The rules are derived in
docs/checksums.md ("Localization").
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .arrays import ArrayOps


class Located(NamedTuple):
    """Per (batch, head): the located element's row ``i`` and column ``j`` (int ``B N``),
    whether the location is ``ok`` (bool ``B N``), and the element's recomputed ``value``
    (float ``B N``)."""

    i: Any
    j: Any
    ok: Any
    value: Any


def indices(located: Located, ops: ArrayOps):
    """``(row, column)`` per head (int32 ``B N 2``), ``-1`` where nothing was located."""
    ij = ops.int32(ops.stack_last([located.i, located.j]))
    return ops.int32(ops.where(located.ok[..., None], ij, -1))


def flags(diff, thr, ops: ArrayOps):
    """Vector flags, as in a backend's ``verdict``: a NaN or an infinite threshold fails closed."""
    return ~((abs(diff) <= thr) & ops.isfinite(thr))


def most_suspicious(diff, thr, ops: ArrayOps):
    """Index of the largest ``|diff| / thr`` over the last axis; a non-finite residual or
    threshold ranks highest (a fault that overflowed a magnitude makes its own threshold
    infinite and its ratio 0, which must not make it the least suspicious)."""
    ratio = abs(diff) / thr
    broken = ~(ops.isfinite(diff) & ops.isfinite(thr))
    return ops.where(broken | ops.isnan(ratio), float("inf"), ratio).argmax(-1)


def passes_after(d, thr, coef, delta, stored, ref, ops: ArrayOps):
    """Would a check with difference ``d`` and threshold ``thr`` pass once the
    element moves by ``-delta`` (``delta = stored - ref``)?

    ``d − delta`` cancels when the fault is large, so the float32 sums that
    produced ``d`` carry an extra rounding of up to ``coef·|delta|``: the check's
    own coefficient applied to the corrupted element's magnitude. A non-finite
    ``d`` passes when the stored element is the non-finite one; a finite ``d``
    never passes with a non-finite ``delta``. A non-finite threshold never
    passes: its magnitude was computed from corrupted data (a fault upstream of
    this GEMM), so no single output element explains it.
    """
    dz = ops.where(ops.isfinite(delta), delta, 0.0)
    ok = (abs(d - dz) <= thr + coef * abs(dz)) & ops.isfinite(delta)
    ok = ops.where(ops.isfinite(d), ok, ~ops.isfinite(stored) & ops.isfinite(ref))
    return ok & ops.isfinite(thr)


def locate(row, col, coefs, stored_fn, ref_fn, ops: ArrayOps) -> Located:
    """Locate single bad elements of one GEMM output.

    ``row = (diff, thr)`` is ``B N R`` and ``col = (diff, thr)`` is ``B N C``
    (vector granularity); ``coefs`` are the two checks' threshold coefficients.
    ``stored_fn(i, j)`` gathers the stored elements and ``ref_fn(i, j)``
    recomputes them, both ``B N``.
    """
    fr, fc = flags(*row, ops), flags(*col, ops)
    nr, nc = fr.sum(-1), fc.sum(-1)
    i, j = most_suspicious(*row, ops), most_suspicious(*col, ops)
    candidate = (nr <= 1) & (nc <= 1) & (nr + nc >= 1)
    stored, ref = stored_fn(i, j), ref_fn(i, j)
    delta = stored - ref
    ok_row = passes_after(ops.take_last(row[0], i), ops.take_last(row[1], i), coefs[0], delta, stored, ref, ops)
    ok_col = passes_after(ops.take_last(col[0], j), ops.take_last(col[1], j), coefs[1], delta, stored, ref, ops)
    return Located(i, j, candidate & ok_row & ok_col, ref)


def affected_rows(row_flags, col_flags, n_rows: int, located: Located | None, ops: ArrayOps):
    """Rows (bool ``B N R``) a stage's flags implicate: the flagged rows; every row of a
    head where only a column check flagged (the row is unknown); the located row alone
    where an element was located. ``None`` when the stage has no check.

    At ``granularity="global"`` callers pass the per-head flags broadcast to rows.
    """
    if row_flags is None and col_flags is None:
        return None
    ref = row_flags if row_flags is not None else col_flags
    rows = ~ops.ones((*ref.shape[:2], n_rows))
    if row_flags is not None:
        rows = rows | row_flags
    if col_flags is not None:
        head = col_flags.any(-1)
        if row_flags is not None:
            head = head & ~row_flags.any(-1)
        rows = rows | head[..., None]
    if located is not None:
        onehot = ops.arange(n_rows)[None, None, :] == located.i[..., None]
        rows = ops.where(located.ok[..., None], onehot, rows)
    return rows
