"""Fault specification, shared unchanged by both backends.

A :class:`Fault` names one element of one intermediate (or input) of attention
and says how to corrupt it: flip one bit of its IEEE-754 pattern, or set it to
a value. ``attention(..., fault=...)`` takes one ``Fault`` or a sequence of
them. Injection happens inside the scheme, between a computation and its
check, where a real error in a GEMM unit, a softmax unit or memory would land.

Sites and the logical index ``(batch, head, row, column)`` of each (legend in
``ftattn_spec.axes``; the index does not depend on a backend's layout):

============  ===============  ======================================  =========
site          logical shape    what is corrupted                       element
============  ===============  ======================================  =========
``scores``    ``B N T S``      S = scale·QKᵀ, after the GEMM           float32
``probs``     ``B N T S``      P = softmax(S) (``replica`` 0 or 1)     float32
``out``       ``B N T H``      O = P·V, after the GEMM                 float32
``query``     ``B N T H``      the query as read by the kernel         input
``key``       ``B K S H``      the key as read by the kernel           input
``value``     ``B K S H``      the value as read by the kernel         input
``rescale``   ``B N T S``      the fused kernels' rescale factor        float32
                               2^(m_old − m_new) of row T at the tile
                               holding key S (fused forward only)
============  ===============  ======================================  =========

S, P and O are float32 in every scheme (the GEMMs accumulate and the softmax
runs in float32), so their bit positions are 0..31 whatever the input dtype;
the input sites have the input dtype's width (16 or 32 bits).

Bit numbering: **bit 0 is the least significant bit** of the pattern. For
float32, bits 0–22 are the mantissa, 23–30 the exponent and 31 the sign; for
float16 0–9, 10–14 and 15; for bfloat16 0–6, 7–14 and 15. (Some injection
tools count from the sign bit instead.)

Corrupted inputs are not expected to be caught: every checksum is predicted
from the same corrupted input, so the checks stay consistent. The scorecard
(``python -m compare.faults``) reports those sites as unprotected.

``replica=1`` targets the second softmax evaluation of the DMR; only schemes
with ``softmax_dmr`` compute it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

SITES: tuple[str, ...] = ("scores", "probs", "out", "query", "key", "value",
                          "bwd_scores", "bwd_probs", "bwd_dp", "bwd_ds", "bwd_dq", "bwd_dk", "bwd_dv", "rescale",
                          "rowsum")

#: Sites that exist only inside the fused forward kernels, per row and key tile: the online
#: softmax's rescale factor, and the tile's row sum of the probabilities before it enters l; the
#: unfused path has no such values and refuses them.
FUSED_FORWARD_SITES: tuple[str, ...] = ("rescale", "rowsum")

#: Sites inside the fused backward (``implementation="triton"``): S and P recomputed, dP, dS,
#: and the three gradients before their scale. S, P, dP and dS are computed by both backward
#: kernels: ``replica`` 0 is the dQ kernel's, 1 the dK/dV kernel's.
BACKWARD_SITES: tuple[str, ...] = ("bwd_scores", "bwd_probs", "bwd_dp", "bwd_ds", "bwd_dq", "bwd_dk", "bwd_dv")

#: Sites whose element is an input, in the input dtype.
INPUT_SITES: tuple[str, ...] = ("query", "key", "value")

#: Logical axes of each site's index.
SITE_AXES: dict[str, str] = {
    "scores": "BNTS", "probs": "BNTS", "out": "BNTH",
    "query": "BNTH", "key": "BKSH", "value": "BKSH",
    "bwd_scores": "BNTS", "bwd_probs": "BNTS", "bwd_dp": "BNTS", "bwd_ds": "BNTS",
    "bwd_dq": "BNTH", "bwd_dk": "BKSH", "bwd_dv": "BKSH", "rescale": "BNTS", "rowsum": "BNTS",
}

#: The checks that can see a fault at each site (in a scheme that runs them).
SITE_CHECKS: dict[str, tuple[str, ...]] = {
    "scores": ("qk_row", "qk_col"),
    "probs": ("softmax_dmr", "softmax_exp"),
    "out": ("pv_row", "pv_col"),
    "query": (), "key": (), "value": (),
    "bwd_scores": ("bwd_qk_row", "bwd_qk_col"),
    "bwd_probs": ("bwd_softmax", "bwd_softmax_col", "bwd_softmax_kv"),
    "bwd_dp": ("bwd_dp_row", "bwd_dp_col"), "bwd_ds": ("bwd_ds", "bwd_ds_col"),
    "bwd_dq": ("bwd_dq",), "bwd_dk": ("bwd_dk",), "bwd_dv": ("bwd_dv",),
    "rescale": ("softmax_dmr", "softmax_exp"),
    "rowsum": ("softmax_dmr", "softmax_exp"),
}

#: Sites with a second evaluation that ``replica=1`` selects.
REPLICA_SITES: tuple[str, ...] = ("probs", "bwd_scores", "bwd_probs", "bwd_dp", "bwd_ds")

#: What ``on_fault=`` accepts.
ON_FAULT: tuple[str, ...] = ("report", "correct", "raise", "nan")

_WIDTH = {"float16": 16, "bfloat16": 16, "float32": 32, "float64": 64}
_KIND = {"bit": 0, "value": 1, "add": 2, "stuck1": 3, "stuck0": 4}

#: Sites where a stuck-at fault (``Fault(stuck=...)``) and a wildcard index (``None``) may be
#: placed: the forward's S, P and O, in every implementation that injects at them.
STUCK_SITES: tuple[str, ...] = ("scores", "probs", "out")


def element_dtype(site: str, dtype: str) -> str:
    """The dtype of the element a fault at ``site`` corrupts, for inputs of ``dtype`` (the
    intermediates are float32, or float64 for float64 inputs)."""
    return dtype if site in INPUT_SITES or dtype == "float64" else "float32"


def bit_width(site: str, dtype: str) -> int:
    return _WIDTH[element_dtype(site, dtype)]


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass(frozen=True)
class Fault:
    """One corrupted element, or (``stuck``) every element of a region. Exactly one of ``bit`` and
    ``value`` is given.

    Attributes:
      site: one of ``SITES``.
      index: logical ``(batch, head, row, column)``; see the module docs. With ``stuck``, an entry
        may be ``None``: every position along that axis (``(b, n, t, None)`` is a whole row of S,
        ``(None,) * 4`` every element of the call).
      bit: flip this bit of the element (0 = least significant); with ``stuck``, the bit held.
      value: set the element to this number (rounded to the element's dtype).
      stuck: None (a flip), or 1 or 0: ``bit`` is forced to that value in every element the index
        covers (a stuck-at fault of a defective unit; sites ``STUCK_SITES``).
      replica: for ``site="probs"``, which softmax evaluation: 0 (the one the
        output uses) or 1 (the DMR's second evaluation); for the backward's
        S, P, dP and dS (``BACKWARD_SITES``), which kernel's evaluation: 0 the
        dQ kernel's, 1 the dK/dV kernel's.
    """

    site: str
    index: tuple
    bit: int | None = None
    value: float | None = None
    replica: int = 0
    stuck: int | None = None

    def __post_init__(self):
        if not isinstance(self.site, str) or self.site not in SITES:
            raise ValueError(f"fault.site: expected one of {SITES}, got {self.site!r}")
        idx = self.index
        if self.stuck is not None and (not _is_int(self.stuck) or self.stuck not in (0, 1)):
            raise ValueError(f"fault.stuck: expected None, 0 or 1, got {self.stuck!r}")
        if self.stuck is not None and self.site not in STUCK_SITES:
            raise ValueError(f"fault.stuck: applies to sites {STUCK_SITES}, got site {self.site!r}")
        wild = self.stuck is not None
        if (not isinstance(idx, (tuple, list)) or len(idx) != 4
                or not all(_is_int(i) or (wild and i is None) for i in idx)):
            what = "ints or None (every position)" if wild else "ints"
            raise ValueError(f"fault.index: expected 4 {what} (batch, head, row, column) of the logical "
                             f"{SITE_AXES[self.site]} index of site {self.site!r}, got {idx!r}")
        object.__setattr__(self, "index", tuple(None if i is None else int(i) for i in idx))
        if wild and self.bit is None:
            raise ValueError(f"fault.bit: expected the bit a stuck-at fault holds (stuck={self.stuck}), got None")
        if (self.bit is None) == (self.value is None):
            raise ValueError(f"fault.bit, fault.value: expected exactly one of the two, got bit={self.bit!r} "
                             f"and value={self.value!r}")
        if self.bit is not None and (not _is_int(self.bit) or self.bit < 0):
            raise ValueError(f"fault.bit: expected an int >= 0 (0 = least significant bit), got {self.bit!r}")
        if self.value is not None and (isinstance(self.value, bool) or not isinstance(self.value, numbers.Real)):
            raise ValueError(f"fault.value: expected a real number, got {type(self.value).__name__} {self.value!r}")
        if not _is_int(self.replica) or self.replica not in (0, 1):
            raise ValueError(f"fault.replica: expected 0 or 1, got {self.replica!r}")
        if self.replica == 1 and self.site not in REPLICA_SITES:
            raise ValueError(f"fault.replica: expected 0 for site {self.site!r} (only {REPLICA_SITES} have a "
                             f"replica), got 1")


def _unchecked_fault(site: str, index, bit, value, replica: int, stuck: int | None = None) -> "Fault":
    """A ``Fault`` whose leaves may be a framework's traced scalars (rebuilt by ``jax.tree_util``
    inside a transformation); the checks ran when the user built it."""
    f = object.__new__(Fault)
    for name, x in (("site", site), ("index", tuple(index)), ("bit", bit), ("value", value), ("replica", replica),
                    ("stuck", stuck)):
        object.__setattr__(f, name, x)
    return f


def _kind(f: Fault) -> int:
    if f.stuck is not None:
        return _KIND["stuck1" if f.stuck else "stuck0"]
    return _KIND["bit"] if f.bit is not None else _KIND["value"]


def _index(f: Fault) -> tuple:
    """The plan's index: ``-1`` for a wildcard (``None``)."""
    return tuple(-1 if i is None else i for i in f.index)


class FaultPlan(NamedTuple):
    """Faults as arrays of length F, so that a jit-compiled backend can take them as data.

    ``site`` indexes ``SITES``; ``kind`` is 0 (flip ``bit``), 1 (set ``value``),
    2 (add ``value``: a private mode of the test suite), 3 (set ``bit`` to 1) or 4 (set it to
    0); an index of ``-1`` is every position along that axis (kinds 3 and 4 only).
    """

    site: np.ndarray  # int32 [F]
    replica: np.ndarray  # int32 [F]
    index: np.ndarray  # int32 [F, 4], logical
    kind: np.ndarray  # int32 [F]
    bit: np.ndarray  # int32 [F]
    value: np.ndarray  # float64 [F]

    def __len__(self) -> int:  # number of faults
        return int(self.site.shape[0])


#: The columns of a packed fault row, as the fused kernels and the SDPA operator read them.
FAULT_ROW: tuple[str, ...] = ("site", "replica", "b", "n", "i", "j", "kind", "bit")


def sites_of(fault, sites) -> list[str]:
    """The names among ``sites`` that ``fault`` (None, a ``Fault`` or a sequence of them, as a
    user passes it) corrupts. Reads only the sites, which are never traced."""
    faults = [fault] if isinstance(fault, Fault) else list(fault) if isinstance(fault, (list, tuple)) else []
    named = {f.site for f in faults if isinstance(f, Fault)}
    return [s for s in SITES if s in sites and s in named]


def pack_rows(plan, concatenate=np.concatenate):
    """A plan as ``(F, 8)`` integer rows of ``FAULT_ROW`` and its ``(F,)`` values.

    ``plan`` is a ``FaultPlan`` or any NamedTuple of its fields holding arrays of
    one framework; ``concatenate`` is that framework's (``jnp.concatenate`` for
    traced arrays). Dtypes are the caller's to choose.
    """
    ints = concatenate([plan.site[:, None], plan.replica[:, None], plan.index, plan.kind[:, None],
                        plan.bit[:, None]], axis=1)
    return ints, plan.value


def unpack_rows(ints: np.ndarray, values: np.ndarray) -> FaultPlan:
    """The inverse of :func:`pack_rows` for NumPy arrays."""
    i = np.asarray(ints).astype(np.int32)
    col = {name: i[:, k] for k, name in enumerate(FAULT_ROW)}
    return FaultPlan(site=col["site"], replica=col["replica"], index=i[:, 2:6], kind=col["kind"], bit=col["bit"],
                     value=np.asarray(values).astype(np.float64))


def _site_shape(site: str, dims: dict) -> tuple[int, ...]:
    return tuple(dims[a] for a in SITE_AXES[site])


def validate_faults(fault, dims: dict, dtype: str, checks: tuple[str, ...], traced=None) -> FaultPlan | None:
    """Check ``fault`` (None, a ``Fault`` or a sequence of them) against the call.

    ``dims`` are the legend sizes of the call, ``dtype`` the input dtype and
    ``checks`` the scheme's checks. Returns a :class:`FaultPlan` or None.
    Traced indices and bits cannot be range-checked (an index out of range then
    corrupts nothing); ``traced`` builds the plan from them (see :func:`plan`).
    """
    if fault is None:
        return None
    faults = [fault] if isinstance(fault, Fault) else fault
    if not isinstance(faults, (list, tuple)) or not all(isinstance(f, Fault) for f in faults):
        raise TypeError(f"fault: expected None, a ftattn_spec.Fault or a list/tuple of them, "
                        f"got {type(fault).__name__} {fault!r}")
    if not faults:
        return None
    for f in faults:
        shape = _site_shape(f.site, dims)
        if any(_is_int(i) and not 0 <= i < n for i, n in zip(f.index, shape) if i is not None):
            raise ValueError(f"fault.index: expected 0 <= index < {shape} (logical {SITE_AXES[f.site]} of site "
                             f"{f.site!r}), got {f.index}")
        width = bit_width(f.site, dtype)
        if f.bit is not None and _is_int(f.bit) and f.bit >= width:
            raise ValueError(f"fault.bit: expected 0 <= bit < {width} (site {f.site!r} holds "
                             f"{element_dtype(f.site, dtype)}), got {f.bit}")
        if f.replica == 1 and f.site == "probs" and "softmax_dmr" not in checks:
            raise ValueError("fault.replica: expected 0, because this scheme computes one softmax "
                             "(only schemes with 'softmax_dmr' compute replica 1), got 1")
    concrete = all(_is_int(i) for f in faults for i in (*_index(f), f.bit if f.bit is not None else 0)) and all(
        f.value is None or isinstance(f.value, numbers.Real) for f in faults)
    return plan(faults, None if concrete else traced)


def plan(faults, traced=None) -> FaultPlan:
    """Encode validated faults as a :class:`FaultPlan` (no shape checks).

    ``traced``: for faults whose index, bit or value are a framework's traced
    scalars (a ``Fault`` passed through ``jax.jit``), a pair ``(stack, asarray)``
    of that framework; the plan's arrays are then the framework's.
    """
    if traced is not None:
        stack, asarray = traced
        ints = lambda xs: stack([asarray(x, "int32") for x in xs])  # noqa: E731
        return FaultPlan(
            site=ints([SITES.index(f.site) for f in faults]), replica=ints([f.replica for f in faults]),
            index=stack([ints(_index(f)) for f in faults]),
            kind=ints([_kind(f) for f in faults]),
            bit=ints([f.bit if f.bit is not None else 0 for f in faults]),
            value=stack([asarray(f.value if f.value is not None else 0.0, "float32") for f in faults]))
    return FaultPlan(
        site=np.array([SITES.index(f.site) for f in faults], np.int32),
        replica=np.array([f.replica for f in faults], np.int32),
        index=np.array([_index(f) for f in faults], np.int32).reshape(-1, 4),
        kind=np.array([_kind(f) for f in faults], np.int32),
        bit=np.array([f.bit if f.bit is not None else 0 for f in faults], np.int32),
        value=np.array([f.value if f.value is not None else 0.0 for f in faults], np.float64),
    )


def additive_plan(site: str, index, delta: float, replica: int = 0) -> FaultPlan:
    """A plan that adds ``delta`` at one element: the test suite's private hook."""
    return FaultPlan(np.array([SITES.index(site)], np.int32), np.array([replica], np.int32),
                     np.array([index], np.int32), np.array([_KIND["add"]], np.int32),
                     np.zeros(1, np.int32), np.array([delta], np.float64))


_NP_DTYPES = {"float16": (np.float16, np.uint16), "float32": (np.float32, np.uint32),
              "float64": (np.float64, np.uint64)}


def flip_bit(x: float, dtype: str, bit: int) -> float:
    """NumPy model of a bit flip: ``x`` rounded to ``dtype``, bit ``bit`` (0 = LSB) flipped."""
    if dtype == "bfloat16":
        hi = np.array([x], np.float32).view(np.uint32) >> 16  # truncation is exact for bf16 values
        pattern = (hi ^ np.uint32(1 << bit)) << 16
        return float(pattern.astype(np.uint32).view(np.float32)[0])
    ft, it = _NP_DTYPES[dtype]
    pattern = np.array([x], ft).view(it) ^ it(1 << bit)
    return float(pattern.view(ft)[0])


def wilson_interval(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (``(nan, nan)`` for no trials)."""
    if trials <= 0:
        return (math.nan, math.nan)
    p = successes / trials
    denom = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


class FaultDetected(RuntimeError):
    """Raised by ``attention(..., on_fault="raise")`` when a check flags; ``.report`` holds the report."""

    def __init__(self, report, message: str | None = None):
        self.report = report
        super().__init__(message or "ftattn: a fault was detected in attention (see .report)")
