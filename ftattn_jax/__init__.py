"""ftattn_jax: fault-checked attention for JAX (jit-compiled, layout ``BTNH``)."""

from ftattn_spec import CHECKS, GRANULARITIES, ON_FAULT, SCHEME_NAMES, CheckResult, Fault, FaultDetected, Report

from .api import attention

__all__ = ["CHECKS", "GRANULARITIES", "ON_FAULT", "SCHEME_NAMES", "CheckResult", "Fault", "FaultDetected", "Report",
           "attention"]
