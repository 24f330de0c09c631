"""ftattn_torch: fault-checked attention for PyTorch (eager, layout ``BNTH``)."""

from ftattn_spec import __version__
from ftattn_spec import CHECKS, GRANULARITIES, ON_FAULT, SCHEME_NAMES, CheckResult, Fault, FaultDetected, Report

from .api import attention
from .module import FaultTolerantAttention
from .sdpa import scaled_dot_product_attention

__all__ = ["__version__", "CHECKS", "GRANULARITIES", "ON_FAULT", "SCHEME_NAMES", "CheckResult", "Fault",
           "FaultDetected", "FaultTolerantAttention", "Report", "attention", "scaled_dot_product_attention"]
