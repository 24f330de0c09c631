"""The tally of a call site's verdicts: a few integers a backend adds to on the device.

Every protected call is one *site* (a Hugging Face layer's ``layer_idx``, a Flax
module's path, a name given by the caller, or the caller's file and line). Per
site a backend keeps one row of ``WIDTH`` int32 on the device (``FIELDS``):

* ``calls``: calls counted;
* ``detected``: calls whose report detected something;
* ``nonfinite``: calls whose inputs were not all finite (a cause of ``detected``
  that is not a compute fault);
* ``check``, ``i0``, ``i1``, ``i2``: the first flagged element of the first call
  that flagged one since the tally was zeroed: ``1 +`` the check's position in
  ``NAMED_CHECKS`` (0: none; the forward's checks first, then the backward's), and its
  index in that check's ``flagged`` array
  (``(b, n, row)`` for a row check at ``granularity="vector"``, ``(b, n)`` at
  ``"global"``, ``(b, n, key)`` for ``qk_col``, ``(b, n, h)`` for ``pv_col``;
  ``-1`` pads), so a verdict names the layer, the head and the row.

:func:`encode` makes one call's row and :func:`merge` adds it to a tally, both
with array operations only (no host read), in either framework; :func:`decode`
reads a row on the host into a :class:`SiteTally`. The backward's verdicts are
reports of their own checks (``bwd_*``), located the same way (``(b, n, row)``,
``(b, n, key)``, or ``(b, n)`` for ``bwd_softmax_kv``); a verdict with no report is
:func:`encode_flag`'s row: counted, located nowhere.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

from .arrays import ArrayOps
from .schemes import NAMED_CHECKS

FIELDS: tuple[str, ...] = ("calls", "detected", "nonfinite", "check", "i0", "i1", "i2")
WIDTH = len(FIELDS)
_COUNTS = 3  # the first three fields add; the rest is the first location


class Where(NamedTuple):
    """The first element a check flagged: the check, and its index in the check's ``flagged``
    array (``(b, n, row)`` for a row check at ``granularity="vector"``; ``(b, n)`` at
    ``"global"``; ``(b, n, key)`` for ``qk_col``, ``(b, n, h)`` for ``pv_col``). ``check`` is
    ``None`` for a verdict that carries no location (a bool scalar)."""

    check: str | None
    index: tuple[int, ...]


class SiteTally(NamedTuple):
    """One site's tally, read on the host. ``first``: where the first detecting call flagged
    (None when no call detected, or when it detected only non-finite inputs)."""

    calls: int
    detected: int
    nonfinite: int
    first: Where | None


def encode(report, ops: ArrayOps):
    """One call's row (``WIDTH`` int32 on the report's device), from ``report`` (a ``Report``):
    array operations only, so it runs inside a traced function and reads nothing on the host."""
    detected = ops.int32(report.detected).reshape(())
    one = detected * 0 + 1
    check, index = one * 0, [one * 0 - 1] * 3
    for k in reversed(range(len(NAMED_CHECKS))):  # so the first check in NAMED_CHECKS order that flagged wins
        c = report.checks.get(NAMED_CHECKS[k])
        if c is None or 0 in tuple(c.flagged.shape):
            continue
        here, hit = first_flagged(c.flagged, ops)
        check = ops.where(hit, k + 1, check)
        index = [ops.where(hit, h, i) for h, i in zip(here + [one * 0 - 1] * (3 - len(here)), index)]
    nonfinite = 1 - ops.int32(report.inputs_finite).reshape(())
    return ops.stack_last([one, detected, nonfinite, ops.int32(check), *(ops.int32(i) for i in index)])


def encode_flag(detected, ops: ArrayOps):
    """The row of a call whose verdict is a bool scalar alone: counted, with no location."""
    d = ops.int32(detected).reshape(())
    return ops.stack_last([d * 0 + 1, d, d * 0, d * 0, d * 0 - 1, d * 0 - 1, d * 0 - 1])


def first_flagged(flagged, ops: ArrayOps) -> tuple[list, object]:
    """``([b, n(, x)], hit)`` (int32 scalars, and a bool scalar): the first flagged element of a ``(B, N)`` or ``(B, N, X)`` array, and
    whether there is one. Reduced along X first, so that an array sharded over B and N moves
    ``B·N`` flags between devices, not ``B·N·X``."""
    f = ops.int32(flagged)
    if f.ndim == 3:
        per_bn, along = ops.int32(flagged.any(-1)), f.argmax(-1)
    else:
        per_bn, along = f, None
    flat = per_bn.reshape(-1)
    pos = flat.argmax()
    n = int(per_bn.shape[-1])
    here = [ops.int32(pos // n), ops.int32(pos % n)]
    if along is not None:
        here.append(ops.int32(along.reshape(-1)[pos]))
    return here, flat.max() > 0


def merge(tally, row, ops: ArrayOps):
    """``tally`` with ``row`` added: counts add; the location stays the first one recorded."""
    seen = tally[_COUNTS] > 0
    return ops.stack_last([tally[i] + row[i] for i in range(_COUNTS)]
                          + [ops.where(seen, tally[i], row[i]) for i in range(_COUNTS, WIDTH)])


def zero() -> list[int]:
    """An empty tally, as a host list."""
    return [0, 0, 0, 0, -1, -1, -1]


def merge_host(tally: Sequence[int], row: Sequence[int]) -> list[int]:
    """:func:`merge` on host lists of ints."""
    tally, row = [int(x) for x in tally], [int(x) for x in row]
    keep = tally[_COUNTS] > 0
    return [tally[i] + row[i] for i in range(_COUNTS)] + [tally[i] if keep else row[i] for i in range(_COUNTS, WIDTH)]


def decode(row: Sequence[Any]) -> SiteTally:
    """A host row (``WIDTH`` ints) as a :class:`SiteTally`."""
    r = [int(x) for x in row]
    if len(r) != WIDTH:
        raise ValueError(f"row: expected {WIDTH} integers {FIELDS}, got {len(r)}")
    first = None
    if r[3] > 0:
        first = Where(NAMED_CHECKS[r[3] - 1], tuple(x for x in r[4:] if x >= 0))
    elif r[1] > r[2]:  # a detection with no flagged element recorded: a bool verdict
        first = Where(None, ())
    return SiteTally(calls=r[0], detected=r[1], nonfinite=r[2], first=first)


def to_rows(tallies: Mapping[str, SiteTally]) -> dict[str, list[int]]:
    """Site tallies as plain rows (JSON-ready), the inverse of :func:`from_rows`: for a backend
    that moves them between processes as bytes."""
    rows = {}
    for site, t in tallies.items():
        check = 0 if t.first is None or t.first.check is None else NAMED_CHECKS.index(t.first.check) + 1
        index = list(t.first.index) if t.first is not None else []
        rows[site] = [t.calls, t.detected, t.nonfinite, check, *(index + [-1] * (3 - len(index)))]
    return rows


def from_rows(rows: Mapping[str, Sequence[int]]) -> dict[str, SiteTally]:
    """:func:`to_rows`' rows as site tallies."""
    return {site: decode(row) for site, row in rows.items()}
