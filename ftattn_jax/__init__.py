"""ftattn_jax: fault-checked attention for JAX (jit-compiled, layout ``BTNH``)."""

from ftattn_spec import CHECKS, GRANULARITIES, SCHEME_NAMES, CheckResult, Report

from .api import attention

__all__ = ["CHECKS", "GRANULARITIES", "SCHEME_NAMES", "CheckResult", "Report", "attention"]
