"""``FaultTolerantAttention``: ftattn's SDPA as an ``nn.Module`` that keeps count of faults."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ftattn_spec import implementations, policy
from ftattn_spec import validation as v
from ftattn_spec.report import Report

from .sdpa import sdpa_call


class FaultTolerantAttention(nn.Module):
    """Scaled dot-product attention with fault checks, for models that hold attention as a module.

    ``forward(query, key, value, attn_mask=None, is_causal=None, scale=None, fault=None)``
    has the semantics of ``scaled_dot_product_attention`` (layout ``(B, N, T, H)``);
    ``is_causal=None`` uses the module's default. The settings (``scheme``,
    ``granularity``, ``on_fault``, ``enable_gqa``, ``implementation``) are fixed
    at construction and validated there.

    State, so that a fault is counted rather than lost:

    * ``last_report``: the ``Report`` of the latest call (not a buffer);
    * buffer ``faults_detected`` (int64 scalar): calls in which a check flagged,
      accumulated on the device without a host synchronisation;
    * buffer ``calls`` (int64 scalar): calls made.

    ``reset_counters()`` sets both counters to zero.
    """

    def __init__(self, *, scheme: str = "full", granularity: str = "vector", on_fault: str = "report",
                 is_causal: bool = False, enable_gqa: bool = False, implementation: str | None = None,
                 site: str | int | None = None):
        super().__init__()
        self.scheme = v.validate_scheme(scheme)
        self.granularity = v.validate_granularity(granularity)
        self.on_fault = v.validate_on_fault(on_fault)
        self.is_causal = v.validate_is_causal(is_causal)
        if not isinstance(enable_gqa, bool):
            raise TypeError(f"enable_gqa: expected a bool, got {type(enable_gqa).__name__} {enable_gqa!r}")
        self.enable_gqa = enable_gqa
        self.implementation = implementations.resolve("torch", implementation)
        self.site = policy.validate_site(site) or f"{type(self).__name__}@{id(self):x}"
        self.last_report: Report | None = None
        # not persistent: a checkpoint of a model without ftattn loads strictly (and one saved
        # with these counters by an earlier version loads too: _load_from_state_dict)
        self.register_buffer("faults_detected", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64), persistent=False)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                is_causal: bool | None = None, scale: float | None = None, fault=None) -> Tensor:
        causal = self.is_causal if is_causal is None else is_causal
        out, report = sdpa_call(
            query, key, value, attn_mask, is_causal=causal, scale=scale, enable_gqa=self.enable_gqa,
            scheme=self.scheme, granularity=self.granularity, on_fault=self.on_fault, fault=fault,
            takes_report=False, implementation=self.implementation, site=self.site)
        self.last_report = report
        with torch.no_grad():
            self.faults_detected += report.detected.to(self.faults_detected.device, torch.int64)
            self.calls += 1
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("faults_detected", "calls"):  # saved by earlier versions: take them, do not complain
            value = state_dict.pop(prefix + name, None)
            if value is not None:
                getattr(self, name).copy_(value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_counters(self) -> None:
        self.faults_detected.zero_()
        self.calls.zero_()

    def extra_repr(self) -> str:
        return (f"scheme={self.scheme!r}, granularity={self.granularity!r}, on_fault={self.on_fault!r}, "
                f"is_causal={self.is_causal}, enable_gqa={self.enable_gqa}, implementation={self.implementation!r}")
