"""Report containers, shared unchanged by both backends.

``attention`` returns ``(out, report)``. The report's leaves are arrays of the
backend (``jax.Array`` or ``torch.Tensor`` on the input's device), never Python
bools, so no host synchronisation is needed to build it. Both containers are
NamedTuples, hence JAX pytrees, so ``attention`` works under ``jax.jit`` and
``jax.vmap``.

Array shapes (see ``ftattn_spec.axes``): with ``granularity="vector"`` a row
check (``qk_row``, ``softmax_dmr``, ``pv_row``) gives ``(B, N, T)`` and a column
check (``qk_col``) gives ``(B, N, S)``; with ``granularity="global"`` every
check gives ``(B, N)``.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple


class CheckResult(NamedTuple):
    """One check's verdict at the scheme's granularity."""

    #: |actual − predicted| (for ``softmax_dmr``: Σ_j |p_ij − p'_ij|), float32.
    residual: Any
    #: The rounding-error bound of ``docs/tolerances.md`` for this residual, float32.
    threshold: Any
    #: ``not (residual <= threshold)``, bool: a NaN residual fails closed.
    flagged: Any


class Report(NamedTuple):
    """What the checks of one ``attention`` call found."""

    #: bool scalar: did any check flag anything.
    detected: Any
    #: check name → ``CheckResult``, for the checks the scheme runs (in ``CHECKS`` order).
    checks: Mapping[str, CheckResult]
    #: bool scalar: were query, key and value all finite. A NaN or Inf input is
    #: not a compute fault, but it makes the residuals NaN, so the checks fail
    #: closed and ``detected`` is True; this field tells the two causes apart.
    inputs_finite: Any


REPORT_FIELDS: tuple[str, ...] = Report._fields
CHECK_FIELDS: tuple[str, ...] = CheckResult._fields
