"""ftattn_jax: fault-checked attention for JAX (jit-compiled, layout ``BTNH``).

``ftattn_jax.flax`` (imported on demand, it needs Flax) holds the Flax adapter.
"""

from ftattn_spec import __version__
from ftattn_spec import CHECKS, GRANULARITIES, ON_FAULT, SCHEME_NAMES, CheckResult, Fault, FaultDetected, Report

from .api import attention
from .nn import dot_product_attention

__all__ = ["__version__", "CHECKS", "GRANULARITIES", "ON_FAULT", "SCHEME_NAMES", "CheckResult", "Fault",
           "FaultDetected", "Report", "attention", "dot_product_attention"]
