"""``dot_product_attention``: a drop-in for ``jax.nn.dot_product_attention``."""

from __future__ import annotations

from typing import Sequence

from ftattn_spec.faults import Fault

from .api import dispatch

_NAMES = ("mask", "bias", "query_seq_lengths", "key_value_seq_lengths", "local_window_size")


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale: float | None = None,
                          is_causal: bool = False, query_seq_lengths=None, key_value_seq_lengths=None,
                          local_window_size: int | tuple[int, int] | None = None, implementation: str | None = None,
                          return_residual: bool = False, scheme: str = "full", granularity: str = "vector",
                          on_fault: str = "report", fault: Fault | Sequence[Fault] | None = None,
                          return_report: bool = False, site: str | int | None = None):
    """``jax.nn.dot_product_attention`` with fault checks.

    The positional and keyword arguments up to ``implementation`` have the
    meaning they have in ``jax.nn.dot_product_attention``: query ``(B, T, N, H)``
    or ``(T, N, H)``, key and value ``(B, S, K, H)`` or ``(S, K, H)`` (grouped-query
    attention when ``K < N``), an additive ``bias`` and a boolean ``mask`` (True
    = attend) broadcastable to ``(B, N, T, S)``, int32 ``(B,)`` sequence
    lengths, a ``(left, right)`` local window. The softmax runs in float32 and
    masked logits are filled with a large finite negative number, so a fully
    masked row is spread uniformly over all keys, as in ``jax.nn``; rows beyond
    ``query_seq_lengths`` are zero.

    ``implementation``: ``None`` or ``"auto"`` (the default: the fused Pallas
    kernel on a GPU where it takes the call, else unfused; see
    ``ftattn_jax.attention``), ``"unfused"``, ``"xla"`` (the same unfused
    schemes, which XLA compiles) or ``"pallas"``. ``"cudnn"`` is an error:
    cuDNN's kernel cannot be checked.

    Keyword-only extras: ``scheme``, ``granularity``, ``on_fault`` and
    ``fault`` as in ``ftattn_jax.attention``; ``return_report=True`` returns
    ``(out, report)`` instead of ``out``; ``site`` names the call in
    ``ftattn_jax.counters`` (default: the caller's file and line). Without
    ``return_report`` the call is under ``ftattn_jax.fault_policy`` (what a
    detection does when nobody reads the report). ``return_residual=True`` is
    not supported (an error).

    Differentiable (``jax.grad``): the gradient is that of plain attention;
    the backward pass is not checked.
    """
    if return_residual is not False:
        raise ValueError(f"return_residual: expected False (ftattn does not return the logsumexp), "
                         f"got {return_residual!r}")
    if not isinstance(return_report, bool):
        raise TypeError(f"return_report: expected a bool, got {type(return_report).__name__} {return_report!r}")
    squeeze = getattr(query, "ndim", 4) == 3
    if squeeze:  # (T, N, H) like jax.nn: a batch of one
        query, key, value = (x[None] if getattr(x, "ndim", 0) == 3 else x for x in (query, key, value))
    out, report = dispatch(
        query, key, value, bias=bias, mask=mask, scheme=scheme, granularity=granularity, scale=scale,
        is_causal=is_causal, query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size, on_fault=on_fault, fault=fault, empty="uniform", names=_NAMES,
        implementation=implementation, takes_report=return_report, site=site)
    if squeeze:
        out = out[0]
    return (out, report) if return_report else out
