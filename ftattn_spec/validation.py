"""Framework-free validation of ``attention`` arguments.

Both backends reduce their arrays to ``(shape, dtype name)`` and call these
functions, so the same bad input gets the same error in JAX and PyTorch. Every
error names the argument, what was expected and what was given.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

from .axes import LAYOUTS
from .faults import ON_FAULT, FaultPlan, validate_faults
from .implementations import checks_for
from .schemes import GRANULARITIES, SCHEME_NAMES, SCHEMES

SUPPORTED_DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")


def _one_of(name: str, value, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a str, one of {allowed}, got {type(value).__name__} {value!r}")
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
    return value


def validate_scheme(scheme) -> str:
    return _one_of("scheme", scheme, SCHEME_NAMES)


def validate_granularity(granularity) -> str:
    return _one_of("granularity", granularity, GRANULARITIES)


def validate_on_fault(on_fault) -> str:
    return _one_of("on_fault", on_fault, ON_FAULT)


def validate_is_causal(is_causal) -> bool:
    # numpy.bool_ is accepted; ints and arrays are not (a traced value cannot
    # choose the mask structure).
    if type(is_causal).__name__ not in ("bool", "bool_"):
        raise TypeError(f"is_causal: expected a Python bool, got {type(is_causal).__name__} {is_causal!r}")
    return bool(is_causal)


def resolve_scale(scale, head_dim: int) -> float:
    """``scale`` as a float; ``None`` means ``head_dim ** -0.5``."""
    if scale is None:
        return float(head_dim) ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(
            f"scale: expected a positive finite Python float (or None for H ** -0.5), "
            f"got {type(scale).__name__} {scale!r}"
        )
    value = float(scale)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"scale: expected a positive finite number, got {scale!r}")
    return value


def validate_dtypes(query: str, key: str, value: str, floating: dict[str, bool]) -> str:
    """Check the three dtype names; ``floating`` tells which names are floating point."""
    for name, dt in (("query", query), ("key", key), ("value", value)):
        if not floating.get(dt, False):
            raise TypeError(f"{name}: expected a floating dtype, one of {SUPPORTED_DTYPES}, got {dt}")
        if dt not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: expected dtype one of {SUPPORTED_DTYPES}, got {dt}")
    if not query == key == value:
        raise TypeError(
            f"query, key, value: expected one dtype for all three, got query {query}, key {key}, value {value}"
        )
    return query


def validate_shapes(layout_q: str, layout_kv: str, q_shape, k_shape, v_shape) -> dict[str, int]:
    """Check ranks and sizes; return the legend sizes ``{B, T, S, N, K, H}``.

    ``layout_q`` uses the letters B T N H, ``layout_kv`` the letters B S K H.
    """
    for name, shape, layout in (("query", q_shape, layout_q), ("key", k_shape, layout_kv),
                                ("value", v_shape, layout_kv)):
        if len(shape) != 4:
            raise ValueError(
                f"{name}: expected a rank-4 array of layout {layout} "
                f"({', '.join(layout)}), got rank {len(shape)} with shape {tuple(shape)}"
            )
        if any(int(n) < 1 for n in shape):
            raise ValueError(f"{name}: expected every dimension >= 1 (layout {layout}), got shape {tuple(shape)}")
    q = dict(zip(layout_q, (int(n) for n in q_shape)))
    k = dict(zip(layout_kv, (int(n) for n in k_shape)))
    if tuple(k_shape) != tuple(v_shape):
        raise ValueError(
            f"value: expected the shape of key {tuple(k_shape)} (layout {layout_kv}), got {tuple(v_shape)}"
        )
    if k["B"] != q["B"]:
        raise ValueError(f"key: expected batch size B={q['B']} of query, got B={k['B']} (shape {tuple(k_shape)})")
    if k["H"] != q["H"]:
        raise ValueError(
            f"key: expected head dim H={q['H']} of query, got H={k['H']} (shape {tuple(k_shape)})"
        )
    if q["N"] % k["K"] != 0:
        raise ValueError(
            f"key: expected a number of kv heads K that divides the query heads N={q['N']}, "
            f"got K={k['K']} (shape {tuple(k_shape)})"
        )
    return {"B": q["B"], "T": q["T"], "S": k["S"], "N": q["N"], "K": k["K"], "H": q["H"]}


class Settings(NamedTuple):
    """Validated arguments of one ``attention`` call."""

    scheme: str
    granularity: str
    scale: float
    is_causal: bool
    dtype: str
    dims: dict
    on_fault: str = "report"
    plan: FaultPlan | None = None
    #: the implementation that runs the call (a canonical name of the catalogue)
    implementation: str = "unfused"
    #: the checks ``scheme`` runs under ``implementation`` (``implementations.run_checks``)
    checks: tuple[str, ...] = ()


def validate_attention(backend: str, shapes, dtypes, *, scheme, granularity, scale, is_causal,
                       on_fault="report", fault=None, implementation="unfused", traced_faults=None) -> Settings:
    """Validate every argument of ``attention`` for ``backend`` (``"jax"`` or ``"torch"``).

    ``shapes`` are the (query, key, value) shapes and ``dtypes`` their
    ``(name, is_floating)`` pairs; the order of the checks fixes which error
    a call with several problems gets, the same in both backends.
    ``implementation`` is a name :func:`implementations.resolve` returned; the
    checks it runs for ``scheme`` are resolved here, once. ``traced_faults``: see
    ``faults.plan`` (a JAX fault plan passed through ``jax.jit``).
    """
    scheme = validate_scheme(scheme)
    granularity = validate_granularity(granularity)
    is_causal = validate_is_causal(is_causal)
    on_fault = validate_on_fault(on_fault)
    dtype = validate_dtypes(*(name for name, _ in dtypes), floating=dict(dtypes))
    dims = validate_shapes(*LAYOUTS[backend], *shapes)
    scale = resolve_scale(scale, dims["H"])
    plan = validate_faults(fault, dims, dtype, SCHEMES[scheme].checks, traced_faults)
    # a scheme it cannot run at all is refused by implementations.unsupported
    return Settings(scheme, granularity, scale, is_causal, dtype, dims, on_fault, plan, implementation,
                    checks_for(backend, implementation, scheme))


def validate_dropout(dropout_p) -> None:
    """ftattn computes no dropout: a non-zero ``dropout_p`` is an error, not ignored."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p: expected a float, got {type(dropout_p).__name__} {dropout_p!r}")
    if float(dropout_p) != 0.0:
        raise ValueError(f"dropout_p: expected 0.0, got {dropout_p!r}. ftattn does not apply dropout to the "
                         f"attention probabilities (it would change P after the checks); apply dropout "
                         f"elsewhere, or use dropout_p=0.0 (e.g. in eval mode)")
