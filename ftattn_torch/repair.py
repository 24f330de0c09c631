"""Localization and repair for the PyTorch backend; same rules as ``ftattn_jax.repair``.

A GEMM with a row and a column checksum locates a single bad element: one
flagged row and at most one flagged column (or the reverse) name a candidate,
the most suspicious one on the unflagged axis when only one axis flagged. The
candidate is accepted only if replacing it by a recomputed value (one dot
product) would make both checks pass at that row and column.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


class Located(NamedTuple):
    """Per (batch, head): the located element's row ``i`` and column ``j``, whether
    the location is ``ok``, and the element's recomputed ``value``."""

    i: Int[Tensor, "B N"]
    j: Int[Tensor, "B N"]
    ok: Bool[Tensor, "B N"]
    value: Float[Tensor, "B N"]

    def indices(self) -> Int[Tensor, "B N 2"]:
        """``(row, column)`` per head, ``-1`` where nothing was located."""
        ij = torch.stack([self.i, self.j], -1).to(torch.int32)
        return torch.where(self.ok[..., None], ij, torch.full_like(ij, -1))


def flags(diff: Tensor, thr: Tensor) -> Tensor:
    """Vector flags, as in ``checks.verdict``: a NaN or an infinite threshold fails closed."""
    return ~((diff.abs() <= thr) & thr.isfinite())


def _most_suspicious(diff: Tensor, thr: Tensor) -> Tensor:
    """Index of the largest ``|diff| / thr``; a non-finite residual or threshold
    ranks highest (see ``ftattn_jax.repair._most_suspicious``)."""
    ratio = diff.abs() / thr
    broken = ~(diff.isfinite() & thr.isfinite())
    return torch.where(broken | ratio.isnan(), torch.inf, ratio).argmax(-1)


def _passes_after(d, thr, coef, delta, stored, ref):
    """Would the check pass once the element moves by ``-delta``? (See
    ``ftattn_jax.repair._passes_after`` for the ``coef·|delta|`` term and why a
    non-finite threshold never passes.)"""
    dz = torch.where(delta.isfinite(), delta, 0.0)
    ok = ((d - dz).abs() <= thr + coef * dz.abs()) & delta.isfinite()
    ok = torch.where(d.isfinite(), ok, ~stored.isfinite() & ref.isfinite())
    return ok & thr.isfinite()


def locate(row, col, coefs, stored_fn, ref_fn) -> Located:
    """Locate single bad elements of one GEMM output (``row``: ``B N R`` diff and
    threshold; ``col``: ``B N C``); see ``ftattn_jax.repair.locate``."""
    fr, fc = flags(*row), flags(*col)
    nr, nc = fr.sum(-1), fc.sum(-1)
    i, j = _most_suspicious(*row), _most_suspicious(*col)
    candidate = (nr <= 1) & (nc <= 1) & (nr + nc >= 1)
    stored, ref = stored_fn(i, j), ref_fn(i, j)
    delta = stored - ref
    pick = lambda a, k: a.gather(-1, k[..., None])[..., 0]  # noqa: E731
    ok_row = _passes_after(pick(row[0], i), pick(row[1], i), coefs[0], delta, stored, ref)
    ok_col = _passes_after(pick(col[0], j), pick(col[1], j), coefs[1], delta, stored, ref)
    return Located(i, j, candidate & ok_row & ok_col, ref)


def affected_rows(row_flags: Tensor | None, col_flags: Tensor | None, n_rows: int,
                  located: Located | None) -> Tensor | None:
    """Rows (``B N R``) a stage's flags implicate; see ``ftattn_jax.repair.affected_rows``."""
    if row_flags is None and col_flags is None:
        return None
    ref = row_flags if row_flags is not None else col_flags
    rows = torch.zeros((*ref.shape[:2], n_rows), dtype=torch.bool, device=ref.device)
    if row_flags is not None:
        rows |= row_flags
    if col_flags is not None:
        head = col_flags.any(-1)
        if row_flags is not None:
            head &= ~row_flags.any(-1)
        rows |= head[..., None]
    if located is not None:
        onehot = torch.arange(n_rows, device=ref.device) == located.i[..., None]
        rows = torch.where(located.ok[..., None], onehot, rows)
    return rows
