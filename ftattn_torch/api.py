"""Public entry point of the PyTorch backend: validate, then dispatch."""

from __future__ import annotations

import torch

from ftattn_spec import validation as v
from ftattn_spec.axes import LAYOUTS
from ftattn_spec.report import Report

from . import core

_LAYOUT_Q, _LAYOUT_KV = LAYOUTS["torch"]


def _as_tensor(name: str, x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    raise TypeError(f"{name}: expected a torch.Tensor of layout "
                    f"{_LAYOUT_Q if name == 'query' else _LAYOUT_KV}, got {type(x).__name__}")


def _dtype_name(x: torch.Tensor) -> tuple[str, bool]:
    return str(x.dtype).removeprefix("torch."), x.dtype.is_floating_point


def attention(query, key, value, *, scheme: str = "full", granularity: str = "vector",
              scale: float | None = None, is_causal: bool = False) -> tuple[torch.Tensor, Report]:
    """Fault-checked attention in ``scaled_dot_product_attention``'s layout.

    Args:
      query: ``(B, N, T, H)`` float16, bfloat16 or float32.
      key, value: ``(B, K, S, H)``, same dtype and device; ``K`` divides ``N``
        (grouped-query attention when ``K < N``; query head ``n`` reads kv head
        ``n // (N // K)``).
      scheme: one of ``ftattn_spec.SCHEME_NAMES``.
      granularity: ``"vector"`` (one verdict per row or column) or ``"global"``
        (one per batch and head).
      scale: logit scale, default ``H ** -0.5``.
      is_causal: upper-left-aligned causal mask (query ``i`` attends keys ``j <= i``).

    Returns:
      ``(out, report)``: ``out`` is ``(B, N, T, H)`` in the input dtype; ``report``
      is a ``ftattn_spec.Report`` of tensors on the input's device (no host sync).

    Autograd flows through ``out`` as through plain attention (the checks are
    computed without a graph, and the backward pass itself is not checked).
    """
    query, key, value = (_as_tensor(n, x) for n, x in (("query", query), ("key", key), ("value", value)))
    cfg = v.validate_attention("torch", (query.shape, key.shape, value.shape),
                               [_dtype_name(x) for x in (query, key, value)],
                               scheme=scheme, granularity=granularity, scale=scale, is_causal=is_causal)
    if not (query.device == key.device == value.device):
        raise ValueError(f"query, key, value: expected one device for all three, got query {query.device}, "
                         f"key {key.device}, value {value.device}")
    return core.run(query, key, value, scheme=cfg.scheme, granularity=cfg.granularity, scale=cfg.scale,
                    is_causal=cfg.is_causal)
