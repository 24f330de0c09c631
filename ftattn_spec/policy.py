"""What a detected fault does in calls that do not ask for the report: the process-wide policy.

A drop-in deep inside a model returns the output alone; its report would be
dropped. The policy, set once (``set_policy``) or for a block
(``fault_policy``, a context manager like ``torch.nn.attention.sdpa_kernel``),
decides what such a call does with a detection:

* ``"count"`` (the default): add it to the backend's counters
  (``ftattn_jax.counters``, ``ftattn_torch.counters``), nothing else;
* ``"warn"``: count, and warn (``FaultWarning``) naming the call site;
* ``"raise"``: run with ``on_fault="raise"`` (``FaultDetected``; under a JAX
  transformation a ``checkify`` check);
* ``"poison"``: run with ``on_fault="nan"`` (the affected rows become NaN,
  so the loss does too).

An explicit ``on_fault`` other than ``"report"`` wins over the policy; calls
that return the report (``attention``, ``return_report=True``) are counted
but otherwise left alone. Every protected call is counted, whatever the policy.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

POLICIES: tuple[str, ...] = ("count", "warn", "raise", "poison")


class FaultWarning(UserWarning):
    """A check flagged in a call whose report nobody reads (policy ``"warn"``)."""


_policy = {"value": "count"}
_lock = threading.Lock()


def _check(policy) -> str:
    if not isinstance(policy, str) or policy not in POLICIES:
        raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
    return policy


def get_policy() -> str:
    """The policy in force."""
    return _policy["value"]


def set_policy(policy: str) -> str:
    """Set the process-wide policy; returns the previous one."""
    policy = _check(policy)
    with _lock:
        previous, _policy["value"] = _policy["value"], policy
    return previous


@contextlib.contextmanager
def fault_policy(policy: str):
    """``with fault_policy("raise"): ...``: the policy for the block, restored after it."""
    previous = set_policy(policy)
    try:
        yield
    finally:
        set_policy(previous)


def effective_on_fault(on_fault: str, takes_report: bool) -> tuple[str, bool]:
    """``(on_fault to run with, whether to warn on a detection)`` for a call under the policy."""
    policy = get_policy()
    if takes_report or on_fault != "report":
        return on_fault, False
    if policy == "raise":
        return "raise", False
    if policy == "poison":
        return "nan", False
    return on_fault, policy == "warn"


_OURS = ("ftattn_spec", "ftattn_jax", "ftattn_torch")
#: module prefixes that stand between a user's code and ours: a module's ``__call__``
_WRAPPERS = ("torch.nn.modules.module", "flax.")


def internal_frame(frame) -> bool:
    """Whether a stack frame belongs to ftattn or to a framework's module-call wrapper."""
    name = frame.f_globals.get("__name__", "")
    return name.split(".")[0] in _OURS or name.startswith(_WRAPPERS)


def _first_outside(frame) -> tuple:
    """``(frame, steps)``: the first frame at or above ``frame`` outside ftattn, and how many
    frames up it is."""
    steps = 0
    while frame is not None and internal_frame(frame):
        frame, steps = frame.f_back, steps + 1
    return frame, steps


def caller_site() -> str:
    """``"file:line"`` of the first frame outside ftattn: the counters' key of a call with no name."""
    frame, _ = _first_outside(sys._getframe(1))
    if frame is None:  # pragma: no cover
        return "<unknown>"
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"


def caller_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made in the calling function that points the
    warning at the first frame outside ftattn (the user's call)."""
    return 1 + _first_outside(sys._getframe(1))[1]


def validate_site(site) -> str | None:
    if site is None or isinstance(site, str):
        return site
    if isinstance(site, int) and not isinstance(site, bool):
        return f"layer {site}"
    raise TypeError(f"site: expected None, a str or an int (a layer index), got {type(site).__name__} {site!r}")
