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

from typing import Any, Mapping, NamedTuple


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


REPORT_FIELDS: tuple[str, ...] = Report._fields
CHECK_FIELDS: tuple[str, ...] = CheckResult._fields


def make_report(*, detected, checks, inputs_finite, located, corrected) -> Report:
    """The report of one call, built the same way by every implementation.

    ``detected`` is the checks' verdict; a non-finite input makes it True as
    well, so that no scheme (``baseline`` and the schemes whose checks do not
    read the bad value included) returns a NaN output with ``detected=False``.
    Works on JAX arrays and torch tensors alike (bool ``|`` and ``~``).
    """
    return Report(detected=detected | ~inputs_finite, checks=checks, inputs_finite=inputs_finite,
                  located=located, corrected=corrected)
