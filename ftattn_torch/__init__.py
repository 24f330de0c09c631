"""ftattn_torch: fault-checked attention for PyTorch (eager, layout ``BNTH``)."""

from ftattn_spec import CHECKS, GRANULARITIES, ON_FAULT, SCHEME_NAMES, CheckResult, Fault, FaultDetected, Report

from .api import attention

__all__ = ["CHECKS", "GRANULARITIES", "ON_FAULT", "SCHEME_NAMES", "CheckResult", "Fault", "FaultDetected", "Report",
           "attention"]
