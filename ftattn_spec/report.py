"""Report containers, shared unchanged by both backends.

``attention`` returns ``(out, report)``. The report's leaves are arrays of the
backend (``jax.Array`` or ``torch.Tensor`` on the input's device), never Python
bools, so no host synchronisation is needed to build it. Both containers are
NamedTuples, hence JAX pytrees, so ``attention`` works under ``jax.jit`` and
``jax.vmap``.

Array shapes (see ``ftattn_spec.axes``): with ``granularity="vector"`` a row
check (``qk_row``, ``softmax_dmr``, ``pv_row``) gives ``(B, N, T)``, the column
check of S (``qk_col``) ``(B, N, S)`` and the column check of O (``pv_col``)
``(B, N, H)``; with ``granularity="global"`` every check gives ``(B, N)``.
After ``on_fault="correct"`` the check results still describe what was
detected before the repair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import numpy as np


@dataclass(frozen=True)
class Ran:
    """Which implementation ran a call and, when ``implementation="auto"`` fell back to the
    unfused path, why. Plain Python data, not arrays (the JAX backend makes it a pytree node
    with no leaves, so a report still crosses ``jax.jit``)."""

    implementation: str
    #: None when the chosen implementation is the one asked for or the fastest one
    #: that fits; otherwise the reason the fused kernel was not taken.
    fallback: str | None = None


class CheckResult(NamedTuple):
    """One check's verdict at the scheme's granularity."""

    #: |actual − predicted| (for ``softmax_dmr``: Σ_j |p_ij − p'_ij|), float32.
    residual: Any
    #: The rounding-error bound of ``docs/tolerances.md`` for this residual, float32.
    threshold: Any
    #: ``not (residual <= threshold and threshold is finite)``, bool: a NaN
    #: residual, or a magnitude that overflowed float32, fails closed.
    flagged: Any


class Report(NamedTuple):
    """What the checks of one ``attention`` call found."""

    #: bool scalar: did any check flag anything, or was an input not finite
    #: (``inputs_finite`` is False), whatever the scheme.
    detected: Any
    #: check name → ``CheckResult``, for the checks the scheme runs (in ``CHECKS`` order).
    checks: Mapping[str, CheckResult]
    #: bool scalar: were query, key and value all finite. A NaN or Inf input is
    #: not a compute fault, but the output it gives is not usable either, so
    #: ``detected`` is True with it under every scheme (``on_fault="raise"``
    #: raises) and the checks that read the value fail closed; this field tells
    #: the two causes apart.
    inputs_finite: Any
    #: GEMM name (``"scores"`` for S, ``"out"`` for O) → int32 ``(B, N, 2)``:
    #: the ``(row, column)`` of the single bad element located in each
    #: (batch, head), or ``(-1, -1)``. Present for a GEMM whose row and column
    #: checks the scheme both runs (``full``), at ``granularity="vector"``.
    located: Mapping[str, Any]
    #: int32 scalar: repairs made by ``on_fault="correct"`` (elements replaced,
    #: rows recomputed, softmax rows replaced by the vote); 0 otherwise.
    corrected: Any
    #: ``Ran``: the implementation that ran the call, and why it fell back if it did
    #: (None only on reports built below the dispatcher).
    ran: Ran | None = None

    def summary(self) -> dict:
        """The report as Python scalars, for logs: ``detected``, ``inputs_finite``,
        ``corrected``, per check the number of flagged rows (or columns, or heads) and
        the worst ``residual / threshold``, per GEMM the heads where an element was
        located, and which implementation ran.

        Reads a few small arrays to the host, so it waits for the device: call it once
        per step (or on a detection), not after every call of a hot loop. Under a JAX
        transformation (traced values) it raises ``TypeError``.
        """
        checks = {}
        for name, c in self.checks.items():
            flagged, residual, threshold = _host(c.flagged), _host(c.residual), _host(c.threshold)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(threshold > 0, residual / threshold, np.where(residual > 0, np.inf, 0.0))
            worst = float(np.nanmax(np.where(np.isnan(ratio), np.inf, ratio))) if ratio.size else 0.0
            checks[name] = {"flagged": int(flagged.sum()), "worst_ratio": worst}
        located = {g: int((_host(x)[..., 0] >= 0).sum()) for g, x in self.located.items()}
        return {"detected": bool(_host(self.detected)), "inputs_finite": bool(_host(self.inputs_finite)),
                "corrected": int(_host(self.corrected)), "checks": checks, "located": located,
                "implementation": None if self.ran is None else self.ran.implementation,
                "fallback": None if self.ran is None else self.ran.fallback}

    def __repr__(self) -> str:
        try:
            d = self.summary()
        except TypeError:  # traced values: no numbers to show
            return f"Report(checks={tuple(self.checks)}, traced)"
        parts = [f"detected={d['detected']}"]
        if not d["inputs_finite"]:
            parts.append("inputs_finite=False")
        for name, c in d["checks"].items():
            parts.append(f"{name}: {c['flagged']} flagged, worst {c['worst_ratio']:.3g}×thr")
        if d["located"]:
            parts.append("located " + ", ".join(f"{g}: {n}" for g, n in d["located"].items()))
        if d["corrected"]:
            parts.append(f"corrected={d['corrected']}")
        if d["implementation"]:
            parts.append(f"ran {d['implementation']}" + (f" (fallback: {d['fallback']})" if d["fallback"] else ""))
        return "Report(" + "; ".join(parts) + ")"

    def to_dict(self) -> dict:
        """Alias of :meth:`summary`."""
        return self.summary()


def _host(x) -> np.ndarray:
    """An array of either framework (or NumPy) as a NumPy array on the host; ``TypeError`` for a
    traced value."""
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu()
    try:
        return np.asarray(x)
    except Exception as e:  # JAX raises its TracerArrayConversionError (a TypeError subclass in most versions)
        raise TypeError(f"report: cannot read a traced value on the host ({type(e).__name__})") from None


def with_ran(report: Report, ran: Ran) -> Report:
    """``report`` with ``ran`` set. Not ``report._replace``: under ``torch.compile`` (torch 2.11)
    a named tuple made by ``_replace`` inside the graph cannot leave it (Dynamo loses its class),
    while one made by calling the class can."""
    return Report(detected=report.detected, checks=report.checks, inputs_finite=report.inputs_finite,
                  located=report.located, corrected=report.corrected, ran=ran)


REPORT_FIELDS: tuple[str, ...] = Report._fields
CHECK_FIELDS: tuple[str, ...] = CheckResult._fields


def make_report(*, detected, checks, inputs_finite, located, corrected, combined: bool = False) -> Report:
    """The report of one call, built the same way by every implementation.

    ``detected`` is the checks' verdict; a non-finite input makes it True as
    well, so that no scheme (``baseline`` and the schemes whose checks do not
    read the bad value included) returns a NaN output with ``detected=False``.
    ``combined=True``: the caller's ``detected`` already includes that (a fused
    kernel counts both in one array; this saves two launches per call).
    Works on JAX arrays and torch tensors alike (bool ``|`` and ``~``).
    """
    return Report(detected=detected if combined else detected | ~inputs_finite, checks=checks,
                  inputs_finite=inputs_finite, located=located, corrected=corrected)
