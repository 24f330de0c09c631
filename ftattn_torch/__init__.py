"""ftattn_torch: fault-checked attention for PyTorch (eager, layout ``BNTH``)."""

from ftattn_spec import __version__
from ftattn_spec import CHECKS, GRANULARITIES, ON_FAULT, SCHEME_NAMES, CheckResult, Fault, FaultDetected, Report

from ftattn_spec.implementations import FallbackWarning
from ftattn_spec.policy import POLICIES, FaultWarning, fault_policy, get_policy, set_policy

from . import counters, distributed, monitor
from .api import attention
from .module import FaultTolerantAttention
from .sdpa import scaled_dot_product_attention

__all__ = ["__version__", "CHECKS", "GRANULARITIES", "ON_FAULT", "SCHEME_NAMES", "CheckResult", "Fault",
           "FallbackWarning", "FaultDetected", "FaultTolerantAttention", "FaultWarning", "POLICIES", "Report",
           "attention", "counters", "distributed", "monitor", "fault_policy", "get_policy", "scaled_dot_product_attention", "set_policy"]
