"""ftattn_torch: fault-checked attention for PyTorch (eager, layout ``BNTH``)."""

from ftattn_spec import CHECKS, GRANULARITIES, SCHEME_NAMES, CheckResult, Report

from .api import attention

__all__ = ["CHECKS", "GRANULARITIES", "SCHEME_NAMES", "CheckResult", "Report", "attention"]
