"""ftattn_jax: fault-checked attention for JAX (jit-compiled, layout ``BTNH``).

``ftattn_jax.flax`` (imported on demand, it needs Flax) holds the Flax adapter.
"""

from ftattn_spec import __version__
from ftattn_spec import CHECKS, GRANULARITIES, ON_FAULT, SCHEME_NAMES, CheckResult, Fault, FaultDetected, Report

from ftattn_spec.implementations import FallbackWarning
from ftattn_spec.policy import POLICIES, FaultWarning, fault_policy, get_policy, set_policy

from . import counters, monitor
from .api import attention
from .nn import dot_product_attention

__all__ = ["__version__", "CHECKS", "GRANULARITIES", "ON_FAULT", "SCHEME_NAMES", "CheckResult", "Fault",
           "FallbackWarning", "FaultDetected", "FaultWarning", "POLICIES", "Report", "attention", "counters", "monitor",
           "dot_product_attention", "fault_policy", "get_policy", "set_policy"]
