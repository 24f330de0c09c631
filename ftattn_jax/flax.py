"""Flax adapter: ftattn as the ``attention_fn`` of Flax's attention modules.

``make_attention_fn(...)`` returns a function that both
``flax.nnx.MultiHeadAttention(attention_fn=...)`` and
``flax.linen.MultiHeadDotProductAttention(attention_fn=...)`` accept. Flax
passes query/key/value of shape ``(batch..., T, N, H)`` and a mask
``(batch..., N, T, S)`` (boolean, or float 0/1 as ``make_causal_mask`` builds:
nonzero attends, as in Flax); any number of leading batch axes is folded into one.

The report is surfaced with Flax's ``sow`` when the module hands itself over,
which it does when called with ``sow_weights=True`` (where Flax's own
attention would sow the attention weights):

* nnx: ``y, inter = nnx.capture(mha, nnx.Intermediate)(x, sow_weights=True)``,
  then ``inter["ftattn_report"]`` (a tuple with one ``Report`` per call; in
  Flax versions without ``nnx.capture``, call ``mha(x, sow_weights=True)`` and
  read ``nnx.pop(mha, nnx.Intermediate)``);
* linen: ``y, state = mha.apply(params, x, sow_weights=True,
  mutable=["intermediates"])``, then
  ``state["intermediates"]["ftattn_report"]``.

Dropout on the attention probabilities is not supported: a non-zero dropout
rate outside deterministic mode raises ``ValueError``. ``precision`` is ignored
(the checks fix their own precision, see ``docs/tolerances.md``); ``dtype``,
if given, is the dtype the inputs are cast to, as in Flax.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp

from ftattn_spec.faults import Fault

from .api import dispatch

_NAMES = ("mask", "bias", "query_seq_lengths", "key_value_seq_lengths", "local_window_size")

#: The name under which the report is sown.
REPORT_NAME = "ftattn_report"


def _fold(x, n_batch: int):
    """``(batch..., a, b, c)`` → ``(B, a, b, c)``, broadcasting smaller batch axes."""
    if x is None:
        return None
    x = jnp.asarray(x)
    if x.ndim < 3:
        x = x.reshape((1,) * (3 - x.ndim) + x.shape)
    lead = x.shape[:-3]
    if len(lead) < n_batch:
        x = x.reshape((1,) * (n_batch - len(lead)) + x.shape)
    return x.reshape((math.prod(x.shape[:-3]),) + x.shape[-3:])


def make_attention_fn(*, scheme: str = "full", granularity: str = "vector", on_fault: str = "report",
                      fault: Fault | Sequence[Fault] | None = None, implementation: str | None = None,
                      sow_name: str = REPORT_NAME):
    """An ``attention_fn`` for Flax (nnx and linen) running ftattn with these settings."""

    def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
                     dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
                     is_causal=False):
        del broadcast_dropout, dropout_rng, precision
        if dropout_rate and not deterministic:
            raise ValueError(f"dropout_rate: expected 0.0 or deterministic=True, got dropout_rate={dropout_rate!r} "
                             f"with deterministic=False. ftattn does not apply dropout to the attention "
                             f"probabilities; set dropout_rate=0.0 in the attention module")
        if dtype is not None:
            query, key, value = (jnp.asarray(x, dtype) for x in (query, key, value))
        batch = query.shape[:-3]
        n_batch = len(batch)
        if key.shape[:-3] != batch or value.shape[:-3] != batch:
            raise ValueError(f"key, value: expected the batch axes {batch} of query, "
                             f"got key {key.shape} and value {value.shape}")
        if mask is not None:  # Flax masks may be float 0/1 (nn.make_causal_mask): nonzero attends
            mask = jnp.asarray(mask).astype(bool)
        q, k, v = (x.reshape((math.prod(batch),) + x.shape[-3:]) for x in (query, key, value))
        if mask is not None and jnp.asarray(mask).ndim > 4 and n_batch > 1:
            mask = jnp.broadcast_to(mask, batch + jnp.asarray(mask).shape[-3:])
        if bias is not None and jnp.asarray(bias).ndim > 4 and n_batch > 1:
            bias = jnp.broadcast_to(bias, batch + jnp.asarray(bias).shape[-3:])
        out, report = dispatch(  # with jax.nn's semantics (a fully masked row is uniform)
            q, k, v, bias=None if bias is None else _fold(bias, n_batch),
            mask=None if mask is None else _fold(mask, n_batch), is_causal=is_causal, scale=None,
            query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
            implementation=implementation, scheme=scheme, granularity=granularity, on_fault=on_fault,
            fault=fault, empty="uniform", names=_NAMES, takes_report=module is not None, site=_site(module))
        if module is not None:
            _sow(module, sow_name, report)
        return out.reshape(batch + out.shape[1:])

    return attention_fn


def _site(module) -> str | None:
    """The counters' key of a Flax module: its path (linen) or its class and identity (nnx). Without
    ``module`` (Flax hands it over only with ``sow_weights=True``), the linen module being called,
    if any; else None (the caller's file and line)."""
    if module is None:
        module = _calling_linen_module()
        if module is None:
            return None
    scope = getattr(module, "scope", None)
    path = getattr(scope, "path", None)
    if path:
        return "/".join(str(p) for p in path)
    return f"{type(module).__name__}@{id(module):x}"


def _calling_linen_module():
    """The linen module whose method is running (linen keeps a stack of them), or None."""
    try:
        from flax.linen import module as linen_module
        stack = linen_module._context.module_stack
    except (ImportError, AttributeError):  # pragma: no cover - a Flax without the stack: call sites instead
        return None
    top = stack[-1] if stack else None
    return top if getattr(getattr(top, "scope", None), "path", None) else None


def _sow(module, name: str, report) -> None:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - linen-only installs
        nnx = None
    if nnx is not None and isinstance(module, nnx.Module):
        module.sow(nnx.Intermediate, name, report)
    else:
        module.sow("intermediates", name, report)
