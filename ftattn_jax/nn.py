"""``dot_product_attention``: a drop-in for ``jax.nn.dot_product_attention``."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from ftattn_spec import implementations
from ftattn_spec import validation as v
from ftattn_spec.axes import REPORT_AXES
from ftattn_spec.faults import Fault
from ftattn_spec.report import CheckResult, Ran, make_report
from ftattn_spec.schemes import CHECK_ORIENTATION

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

    Differentiable (``jax.grad``): on the fused kernel the backward is fused and
    checked (docs/faults.md, "The backward's verdict"); on the unfused path it is
    plain autodiff, not checked.
    """
    if return_residual is not False:
        raise ValueError(f"return_residual: expected False (ftattn does not return the logsumexp), "
                         f"got {return_residual!r}")
    if not isinstance(return_report, bool):
        raise TypeError(f"return_report: expected a bool, got {type(return_report).__name__} {return_report!r}")
    squeeze = getattr(query, "ndim", 4) == 3
    if squeeze:  # (T, N, H) like jax.nn: a batch of one
        query, key, value = (x[None] if getattr(x, "ndim", 0) == 3 else x for x in (query, key, value))
    if _has_zero_size(query, key, value):
        out, report = _zero_size(query, key, value, scheme=scheme, granularity=granularity, scale=scale,
                                 is_causal=is_causal, on_fault=on_fault, fault=fault, implementation=implementation)
        if squeeze:
            out = out[0]
        return (out, report) if return_report else out
    out, report = dispatch(
        query, key, value, bias=bias, mask=mask, scheme=scheme, granularity=granularity, scale=scale,
        is_causal=is_causal, query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size, on_fault=on_fault, fault=fault, empty="uniform", names=_NAMES,
        implementation=implementation, takes_report=return_report, site=site)
    if squeeze:
        out = out[0]
    return (out, report) if return_report else out


def _has_zero_size(*arrays) -> bool:
    return all(hasattr(x, "shape") for x in arrays) and any(0 in tuple(x.shape) for x in arrays)


def _zero_size(query, key, value, *, scheme, granularity, scale, is_causal, on_fault, fault, implementation):
    """A call with an axis of size zero, as ``jax.nn`` computes it: an empty output, or zeros for
    ``S = 0``. Every other argument is validated as usual (on sizes of at least one); the report
    is clean, and ``ran`` says that there was nothing to check."""
    if fault is not None:
        raise ValueError(f"fault: expected None for inputs with a zero-size axis (query {tuple(query.shape)}, "
                         f"key {tuple(key.shape)}), where there is nothing to corrupt; got {fault!r}")
    ones = [tuple(max(int(n), 1) for n in x.shape) for x in (query, key, value)]
    dtypes = [(jnp.dtype(x.dtype).name, jnp.issubdtype(x.dtype, jnp.floating)) for x in (query, key, value)]
    cfg = v.validate_attention("jax", ones, dtypes, scheme=scheme, granularity=granularity, scale=scale,
                               is_causal=is_causal, on_fault=on_fault, fault=None, implementation="unfused")
    if tuple(key.shape) != tuple(value.shape):
        raise ValueError(f"value: expected the shape of key {tuple(key.shape)} (layout BSKH), got {tuple(value.shape)}")
    impl = implementations.resolve("jax", implementation)
    if impl not in (implementations.AUTO, "unfused", "xla"):
        raise ValueError(f"implementation: {impl!r} cannot run inputs with a zero-size axis (query "
                         f"{tuple(query.shape)}, key {tuple(key.shape)}); use 'auto', 'unfused' or 'xla'")
    B, T, N, H = (int(n) for n in query.shape)
    dims = {"B": B, "N": N, "T": T, "S": int(key.shape[1]), "H": H}
    checks = {}
    for name in implementations.checks_for("jax", "unfused", cfg.scheme):
        size = tuple(dims[a] for a in REPORT_AXES[(cfg.granularity, CHECK_ORIENTATION[name])])
        checks[name] = CheckResult(jnp.zeros(size, jnp.float32), jnp.zeros(size, jnp.float32),
                                   jnp.zeros(size, jnp.bool_))
    why = (f"a zero-size axis (query {tuple(query.shape)}, key {tuple(key.shape)}): an empty output or zeros, "
           f"with no products to check")
    report = make_report(detected=jnp.zeros((), jnp.bool_), checks=checks, inputs_finite=jnp.ones((), jnp.bool_),
                         located={}, corrected=jnp.zeros((), jnp.int32))
    return jnp.zeros(query.shape, query.dtype), report._replace(ran=Ran("unfused", why))
