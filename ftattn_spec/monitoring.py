"""A training step's verdict, across call sites and ranks: what both monitors return.

``ftattn_jax.monitor`` and ``ftattn_torch.monitor`` read their backend's
counters once per step (``ftattn_spec.tally``: per site calls, detections and
where the first detection flagged), combine every rank's tallies, and hand back
one :class:`StepVerdict`, the same on every rank. This module holds that
verdict, how per-rank tallies combine (:func:`combine`), how a replay is judged
(:func:`classify`), and the export as scalars for a logger.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

from .schemes import ANY_CHECK_ORIENTATION
from .tally import SiteTally, Where

#: what a replay says of a detection (:func:`classify`)
KINDS: tuple[str, ...] = ("transient", "persistent", "device", "undetermined")


class SiteVerdict(NamedTuple):
    """One call site (a layer) in one step, over every rank. ``ranks``: the ranks where it
    detected; ``first``: rank → where that rank's first detection flagged (check, index)."""

    calls: int
    detected: int
    nonfinite: int
    ranks: tuple[int, ...]
    first: dict[int, Where]


class StepVerdict(NamedTuple):
    """What the monitor found in one step, the same on every rank.

    ``detected``: some call on some rank detected a fault (a check flagged, or an input was
    not finite). ``ranks``: the ranks where that happened. ``sites``: every site counted in
    the step, in the order first seen. ``calls``: protected calls over all sites and ranks.
    """

    step: int
    detected: bool
    calls: int
    ranks: tuple[int, ...]
    sites: dict[str, SiteVerdict]

    def flagged(self) -> dict[str, SiteVerdict]:
        """The sites that detected something."""
        return {s: v for s, v in self.sites.items() if v.detected}

    def summary(self) -> str:
        """One line per detection: rank, site (layer), check, and the index flagged."""
        if not self.detected:
            return f"step {self.step}: clean ({self.calls} protected calls)"
        lines = [f"step {self.step}: fault detected on rank(s) {list(self.ranks)}"]
        for site, v in self.flagged().items():
            for rank in v.ranks:
                w = v.first.get(rank)
                where = ("inputs not finite" if w is None else
                         "location not recorded" if w.check is None else f"{w.check} at {_index(w)}")
                lines.append(f"  rank {rank}, {site}: {where} ({v.detected} of {v.calls} calls)")
        return "\n".join(lines)

    def scalars(self, prefix: str = "ftattn/") -> dict[str, float]:
        """Scalars for a logger: ``detected``, ``calls``, and per flagged site its detections."""
        out = {f"{prefix}detected": float(self.detected), f"{prefix}calls": float(self.calls),
               f"{prefix}detections": float(sum(v.detected for v in self.sites.values()))}
        for site, v in self.flagged().items():
            out[f"{prefix}detections/{site}"] = float(v.detected)
        return out


_LAST_AXIS = {"row": "row", "col": "key", "head": "h"}


def _index(w: Where) -> str:
    names = ("b", "n", _LAST_AXIS[ANY_CHECK_ORIENTATION[w.check]])
    return "(" + ", ".join(f"{a}={i}" for a, i in zip(names, w.index)) + ")"


def combine(step: int, per_rank: list[Mapping[str, SiteTally]]) -> StepVerdict:
    """Every rank's tallies of one step (``per_rank[r]``: site → SiteTally) as one verdict."""
    sites: dict[str, SiteVerdict] = {}
    for rank, tallies in enumerate(per_rank):
        for site, t in tallies.items():
            v = sites.get(site, SiteVerdict(0, 0, 0, (), {}))
            first = dict(v.first)
            if t.detected and t.first is not None:
                first[rank] = t.first
            sites[site] = SiteVerdict(v.calls + t.calls, v.detected + t.detected, v.nonfinite + t.nonfinite,
                                      v.ranks + ((rank,) if t.detected else ()), first)
    ranks = tuple(sorted({r for v in sites.values() for r in v.ranks}))
    return StepVerdict(step=step, detected=bool(ranks), calls=sum(v.calls for v in sites.values()),
                       ranks=ranks, sites=sites)


class Classification(NamedTuple):
    """What replaying a flagged step said (:func:`classify`). ``kind``: ``"transient"`` (the
    replay on the same device was clean), ``"persistent"`` (it detected again, and no other
    device was tried or the other device detected too), ``"device"`` (it detected again on the
    same device and not on the other: a defective device), ``"undetermined"`` (the original
    step was clean: nothing to classify)."""

    kind: str
    original: StepVerdict
    same_device: StepVerdict | None
    other_device: StepVerdict | None


def classify(original: StepVerdict, replay: Callable[[object], StepVerdict], other=None) -> Classification:
    """Replay a flagged step: ``replay(device)`` runs it again and returns its verdict
    (``device`` None: the same device). ``other``: a second device to try when the same device
    detects again."""
    if not original.detected:
        return Classification("undetermined", original, None, None)
    same = replay(None)
    if not same.detected:
        return Classification("transient", original, same, None)
    if other is None:
        return Classification("persistent", original, same, None)
    there = replay(other)
    return Classification("persistent" if there.detected else "device", original, same, there)


class Totals(NamedTuple):
    """A monitor's running totals since it was made: steps read, steps with a detection,
    protected calls, and detections (calls that detected), over every rank."""

    steps: int
    flagged_steps: int
    calls: int
    detections: int


class Monitor:
    """Reads the counters once per step and says what the step's protected calls found.

    A backend makes one with its hooks (``ftattn_jax.monitor.Monitor()``,
    ``ftattn_torch.monitor.Monitor()``): ``read`` (site → SiteTally, one device
    synchronisation), ``reset`` (zero the counters), ``gather`` (every rank's tallies, one
    collective; ``None``: this process alone) and ``rank``. :meth:`step` zeroes the counters
    after reading them, so each verdict covers the calls since the previous one (the first:
    since the counters were last zeroed).
    ``on_step``: callables given each :class:`StepVerdict` (``tensorboard(writer)`` is one).
    """

    def __init__(self, *, read: Callable, reset: Callable, gather: Callable | None = None, rank: int = 0,
                 on_step=()):
        if callable(on_step):
            on_step = (on_step,)
        on_step = tuple(on_step)
        for i, f in enumerate(on_step):
            if not callable(f):
                raise TypeError(f"on_step: expected a callable or a sequence of callables, got "
                                f"{type(f).__name__} at position {i}")
        self._read, self._reset, self._gather, self.rank = read, reset, gather, rank
        self.on_step = on_step
        self.totals = Totals(0, 0, 0, 0)
        self.last: StepVerdict | None = None

    def step(self) -> StepVerdict:
        """The verdict of the calls since the previous step (one read, one collective when
        distributed), passed to every ``on_step`` callable; the counters start again at zero."""
        mine = self._read()
        self._reset()
        per_rank = [mine] if self._gather is None else self._gather(mine)
        verdict = combine(self.totals.steps, per_rank)
        t = self.totals
        self.totals = Totals(t.steps + 1, t.flagged_steps + verdict.detected, t.calls + verdict.calls,
                             t.detections + sum(v.detected for v in verdict.sites.values()))
        self.last = verdict
        for f in self.on_step:
            f(verdict)
        return verdict

    def replay(self, fn: Callable[[object], object], other=None) -> Classification:
        """Classify the last step's detection by running ``fn`` again: ``fn(device)`` recomputes
        the flagged work (the forward, or forward and backward, of the same batch: no optimizer
        update) on ``device`` (None: where it ran). On the same device first; if that detects
        again and ``other`` (a second device) is given, there too. ``"transient"``: the replay was
        clean; ``"device"``: it repeated there and not on ``other`` (quarantine the device);
        ``"persistent"``: it repeated everywhere tried (suspect the data or the model)."""
        if self.last is None:
            raise ValueError("replay: expected a step read first (call step()), got none")
        if not callable(fn):
            raise TypeError(f"fn: expected a callable taking a device (or None), got {type(fn).__name__}")

        pending = self._read()
        if pending:
            raise ValueError(f"replay: expected no protected calls since step() (they would be mixed "
                             f"into the replay's verdict), got calls at {sorted(pending)}; call step() first")

        def again(device):
            fn(device)
            mine = self._read()
            self._reset()
            return combine(self.last.step, [mine] if self._gather is None else self._gather(mine))

        return classify(self.last, again, other)


def tensorboard(writer, prefix: str = "ftattn/") -> Callable[[StepVerdict], None]:
    """An ``on_step`` callable writing :meth:`StepVerdict.scalars` with ``writer.add_scalar``
    (TensorBoard's ``SummaryWriter``, or anything with that method) at the step's number."""
    if not callable(getattr(writer, "add_scalar", None)):
        raise TypeError(f"writer: expected an object with add_scalar(tag, value, step) (a TensorBoard "
                        f"SummaryWriter), got {type(writer).__name__}")

    def write(verdict: StepVerdict) -> None:
        for tag, value in verdict.scalars(prefix).items():
            writer.add_scalar(tag, value, verdict.step)

    return write
