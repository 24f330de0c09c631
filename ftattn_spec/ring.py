"""Ring attention with checks: the algebra, the thresholds and the fault plan, for both backends.

The query sequence is split over ``P`` devices (``T = P·Tc``), and so are the keys and values
(``S = P·Sc``). Device ``d`` keeps its query chunk and, at step ``r = 0 .. P−1``, holds the key
and value chunk ``j = (d − r) mod P``, which it passes on to device ``d + 1`` for the next step.
Each step is one *block*: attention of chunk ``d``'s queries over chunk ``j``'s keys, computed by
the unfused core with the scheme's row checks (``qk_row``, ``softmax_dmr``, ``softmax_exp``,
``pv_row``; the column checks and localization need every query of a key, which no device has).
With ``is_causal`` (``T = S``), block ``j < d`` attends everything, ``j = d`` is causal, and
``j > d`` is skipped.

What the ring adds to the blocks' checks (``docs/tolerances.md``, "Ring attention"):

* ``lse``: a block's log-sum-exp ``m + ln d`` (the merge weights come from it) against the one
  the block's softmax check evaluated apart (the DMR replica's, else the exponential checksum's);
  at the end, the running log-sum-exp against the log-sum-exp of the blocks' stored ones.
  Threshold :func:`lse_threshold`.
* ``weights``: each merge forms ``L = logaddexp(L_acc, lse_j)`` and the weights
  ``w = exp(L_acc − L)``, ``w' = exp(lse_j − L)``, which sum to 1 (:func:`weight_threshold`).
* ``merge``: the merged output ``O ← w·O + w'·O_j`` is linear, so its row sums follow the same
  recursion from the blocks' row sums: after each step, ``Σ_h O_h`` against
  ``c ← w·c + w'·Σ_h O_j,h`` (:func:`merge_threshold`; the weights cancel, so only the merge's
  own rounding enters).
* ``key``, ``value``: a chunk's column sums ``Σ_s K[s]`` (and ``Σ_s V[s]``), made on its home
  device before step 0 and passed around with it, against the chunk as each step reads it
  (:func:`transit_threshold`): a chunk corrupted in memory or in transit is otherwise invisible,
  since every checksum of the block is predicted from the chunk it reads.

Faults (:class:`RingFault`) name a step and a *global* index; :func:`plan` turns them into arrays
of (device, step, local index) that a compiled ring reads as data, so one compilation serves every
fault of the same count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import numpy as np

from . import faults as spec_faults
from . import ring_backward as spec_ring_backward
from . import tolerances as tol
from .schemes import CHECK_ORIENTATION

#: Where a ring fault can land: a block's S, P or O (``faults.SITES``' meaning), the key or value
#: chunk as a step reads it, a block's log-sum-exp, or the running output after a step's merge;
#: then the sites of the checked backward (``ring_backward.SITES``).
FORWARD_SITES: tuple[str, ...] = ("scores", "probs", "out", "key", "value", "lse", "merge")
RING_SITES: tuple[str, ...] = FORWARD_SITES + spec_ring_backward.SITES

#: The sites a block injects itself (``faults.SITES``' names): S, P and O of the forward.
BLOCK_SITES: tuple[str, ...] = ("scores", "probs", "out")

#: Implementations whose ring backward runs each step as one launch of the fused backward, which
#: injects the backward's product sites itself (``faults.BACKWARD_SITES``).
FUSED_BACKWARD: tuple[str, ...] = ("triton", "pallas")

#: Logical axes of each ring site's (global) index.
RING_SITE_AXES: dict[str, str] = {"scores": "BNTS", "probs": "BNTS", "out": "BNTH", "key": "BKSH",
                                  "value": "BKSH", "lse": "BNT", "merge": "BNTH", **spec_ring_backward.SITE_AXES}

#: Sites whose step follows from the index: S and P (and the backward's dP and dS), whose key
#: chunk says which step a row's device reads it.
_IMPLIED_STEP: tuple[str, ...] = ("scores", "probs", "bwd_scores", "bwd_probs", "bwd_dp", "bwd_ds")

#: The ring's own checks, beside the blocks' row checks.
RING_CHECKS: tuple[str, ...] = ("lse", "weights", "merge", "key", "value")

#: Which check sees a fault at each ring site (in a scheme that runs it).
RING_SITE_CHECKS: dict[str, tuple[str, ...]] = {
    "scores": ("qk_row",), "probs": ("softmax_dmr", "softmax_exp"), "out": ("pv_row",),
    "key": ("key",), "value": ("value",), "lse": ("lse",), "merge": ("merge",),
    **spec_ring_backward.SITE_CHECKS}

#: Relative error of float32 ``log`` in units of u, as ``tol.EXP_ERROR_UNITS`` is for ``exp``.
LOG_ERROR_UNITS: float = 16.0


def row_checks(checks) -> tuple[str, ...]:
    """The checks a ring block runs: the row checks among ``checks``."""
    return tuple(c for c in checks if CHECK_ORIENTATION[c] == "row")


def lse_threshold(S: int, mu):
    """Bound on ``|lse − lse'|`` of two evaluations of a row's log-sum-exp over ``S`` keys, ``mu``
    the row's largest attended ``|logit|`` (any array type).

    ``lse = m + ln d``: the maximum ``m`` is exact, each row sum ``d`` has the relative error
    that :func:`tol.dmr_threshold` bounds for a softmax replica (exponentials, their arguments,
    the sums), so ``|ln d − ln d'| ≤ δ/(1 − δ)`` with ``δ`` that bound. Each ``ln`` adds
    ``LOG_ERROR_UNITS·u·ln S`` (``0 ≤ ln d ≤ ln S``), each ``m + ln d`` (and the base-2
    evaluation's scalings by log₂ e and ln 2) ``u·|lse|`` a few times, ``|lse| ≤ μ + ln S``;
    a logit re-formed by the compiler moves each ``lse`` by ``κ·u·μ`` (``tol.dmr_logit_coefficient``).
    """
    S = max(int(S), 1)
    delta = tol.dmr_threshold(S)
    lnS = math.log(S)
    fixed = delta / (1.0 - delta) + tol.U_ACC * 2.0 * LOG_ERROR_UNITS * max(lnS, 1.0)
    return tol.MAGNITUDE_MARGIN * (fixed + tol.U_ACC * 8.0 * (mu + lnS) + 2.0 * tol.dmr_logit_coefficient() * mu)


def weight_threshold(lse_magnitude):
    """Bound on ``|w + w' − 1|`` of one merge, ``lse_magnitude`` the merged ``|L|``.

    ``L = m + ln(e + e')`` with one of ``e, e'`` exactly 1 and the other an exponential: the
    sum's ln is off by ``(EXP_ERROR_UNITS + 1 + LOG_ERROR_UNITS)·u`` (its argument lies in
    ``[1, 2]``), the addition of ``m`` by ``u·|L|``; each weight is an exponential of an argument
    off by that and by its own rounding (``u·|L|`` again at most, ``|L_acc − L| ≤ |L| + |L_acc|``
    is not needed: a weight far below 1 carries its argument's error relative to itself).
    """
    units = 3.0 * tol.EXP_ERROR_UNITS + 2.0 * LOG_ERROR_UNITS + 6.0
    return tol.MAGNITUDE_MARGIN * tol.U_ACC * (units + 4.0 * lse_magnitude)


def merge_threshold(P: int, H: int, magnitude):
    """Bound on ``|Σ_h O_h − c|`` after ``P − 1`` merges (``P`` blocks), ``magnitude`` the merged ``Σ_h |O_j,h|``
    (``a ← w·a + w'·Σ_h |O_j,h|``, formed like ``c``).

    Each merge rounds every element of ``O`` and ``c`` three times (two products, one sum),
    relative to ``w·|x| + w'·|x_j|``: ``γ(3P)`` of the merged magnitudes for each side. The
    blocks' row sums ``c_j`` and the final ``Σ_h O_h`` are sums of ``H`` terms: ``γ(H)`` each.
    The weights' own errors are the same numbers on both sides and cancel.
    """
    g = tol.gamma(3 * max(int(P), 1))
    gh = tol.gamma(max(int(H), 1))
    coefficient = tol.MAGNITUDE_MARGIN * (2.0 * g + 2.0 * gh) * (1.0 + g) * (1.0 + gh)
    return coefficient * magnitude + tol.underflow_allowance(8 * max(int(P), 1) * (max(int(H), 1) + 1))


def transit_threshold(Sc: int, magnitude):
    """Bound on ``|Σ_s K[s] − carried|`` for a chunk of ``Sc`` keys, ``magnitude`` ``Σ_s |K[s]|``:
    two float32 sums of the same numbers in any orders."""
    return tol.MAGNITUDE_MARGIN * 2.0 * tol.gamma(Sc) * magnitude + tol.underflow_allowance(2 * max(int(Sc), 1))


def validate_ring(dims: Mapping[str, int], P: int, is_causal: bool, axis_name) -> tuple[int, int]:
    """The chunk lengths ``(Tc, Sc)`` of a ring of ``P`` devices, or a ``ValueError`` naming the
    argument."""
    T, S = dims["T"], dims["S"]
    if T % P:
        raise ValueError(f"query: expected a query length T divisible by the {P} devices of mesh axis "
                         f"{axis_name!r}, got T={T}")
    if S % P:
        raise ValueError(f"key: expected a key length S divisible by the {P} devices of mesh axis "
                         f"{axis_name!r}, got S={S}")
    if is_causal and T != S:
        raise ValueError(f"is_causal: the ring's causal mask needs T == S (chunk d of the queries against chunk "
                         f"d of the keys), got T={T}, S={S}")
    return T // P, S // P


@dataclass(frozen=True)
class RingFault:
    """One corrupted element of one step of a ring.

    Attributes:
      site: one of ``RING_SITES``.
      index: the global logical index (``RING_SITE_AXES[site]``): ``(b, n, t, s)`` for S and P,
        ``(b, n, t, h)`` for a block's output and the running output, ``(b, k, s, h)`` for a key or
        value, ``(b, n, t)`` for a block's log-sum-exp. The device is the one that holds row ``t``
        (key ``s`` at that step, for a key or value).
      step: the step ``0 .. P−1``; None for ``scores`` and ``probs`` (and the backward's
        ``bwd_scores``, ``bwd_probs``, ``bwd_dp``, ``bwd_ds``), whose key ``s`` says it. A
        backward accumulator (``bwd_dk_acc``, ``bwd_dv_acc``) is corrupted as it leaves step
        ``step`` for the next device (for its home after the last step).
      bit: flip this bit (0 = least significant) of the element; or ``value``: set it.
      replica: 1 for the DMR's second softmax (site ``probs``).
    """

    site: str
    index: tuple
    step: int | None = None
    bit: int | None = None
    value: float | None = None
    replica: int = 0

    def __post_init__(self):
        if not isinstance(self.site, str) or self.site not in RING_SITES:
            raise ValueError(f"fault.site: expected one of {RING_SITES}, got {self.site!r}")
        n = len(RING_SITE_AXES[self.site])
        if not isinstance(self.index, (tuple, list)) or len(self.index) != n or not all(
                spec_faults._is_int(i) for i in self.index):
            raise ValueError(f"fault.index: expected {n} ints (global {RING_SITE_AXES[self.site]}) for site "
                             f"{self.site!r}, got {self.index!r}")
        object.__setattr__(self, "index", tuple(int(i) for i in self.index))
        if (self.bit is None) == (self.value is None):
            raise ValueError(f"fault: expected exactly one of bit and value, got bit={self.bit!r}, value={self.value!r}")
        if self.bit is not None and (not spec_faults._is_int(self.bit) or self.bit < 0):
            raise ValueError(f"fault.bit: expected an int >= 0, got {self.bit!r}")
        if self.step is not None and (not spec_faults._is_int(self.step) or self.step < 0):
            raise ValueError(f"fault.step: expected None or an int >= 0, got {self.step!r}")
        if self.step is None and self.site not in _IMPLIED_STEP:
            raise ValueError(f"fault.step: expected the step (an int) for site {self.site!r}, got None")
        if self.replica not in (0, 1) or (self.replica == 1 and self.site != "probs"):
            raise ValueError(f"fault.replica: expected 0 (or 1 for site 'probs'), got {self.replica!r}")


class RingPlan(NamedTuple):
    """Ring faults as arrays of length F: who injects (``device``, ``step``), where
    (``site`` indexes ``RING_SITES``; ``core_site`` indexes ``faults.SITES`` for a block's S, P
    or O, and under ``FUSED_BACKWARD`` for the backward's products; −1 for the ring's own sites), the block-local index (4 entries, −1 padded), and how
    (``kind``: 0 flip ``bit``, 1 set ``value``)."""

    device: np.ndarray
    step: np.ndarray
    site: np.ndarray
    core_site: np.ndarray
    replica: np.ndarray
    index: np.ndarray
    kind: np.ndarray
    bit: np.ndarray
    value: np.ndarray


def plan(fault, dims: Mapping[str, int], P: int, dtype: str, checks,
         implementation: str = "unfused", backward: str | None = "this call runs no checked backward"
         ) -> RingPlan | None:
    """Validate ``fault`` (None, a :class:`RingFault` or a sequence of them) against a ring of ``P``
    devices over a call of legend sizes ``dims`` and input ``dtype``, whose blocks ``implementation``
    runs; None when there is none. An ``lse`` fault needs unfused blocks: a fused block's
    log-sum-exp has no second evaluation to be checked against. ``backward``: None where a
    checked backward will run this call's gradient, else why not (then a backward site is refused,
    since its fault would never be injected)."""
    if fault is None:
        return None
    faults = [fault] if isinstance(fault, RingFault) else fault
    if not isinstance(faults, (list, tuple)) or not all(isinstance(f, RingFault) for f in faults):
        raise TypeError(f"fault: expected None, a ftattn_spec.ring.RingFault or a list/tuple of them, got "
                        f"{type(fault).__name__} {fault!r}")
    if not faults:
        return None
    Tc, Sc = dims["T"] // P, dims["S"] // P
    rows = []
    for f in faults:
        if f.site == "lse" and implementation != "unfused":
            raise ValueError("fault.site: 'lse' faults need implementation='unfused' (a fused block's log-sum-exp "
                             f"has no second evaluation to be checked against); this call runs {implementation!r}")
        if f.site in spec_ring_backward.SITES and backward is not None:
            raise ValueError(f"fault.site: {f.site!r} is a site of the ring's checked backward, which this call "
                             f"does not run ({backward})")
        shape = tuple(dims[a] for a in RING_SITE_AXES[f.site])
        if not all(0 <= i < n for i, n in zip(f.index, shape)):
            raise ValueError(f"fault.index: expected 0 <= index < {shape} (global {RING_SITE_AXES[f.site]} of "
                             f"site {f.site!r}), got {f.index}")
        width = spec_faults.bit_width(f.site if f.site in spec_faults.SITES else "out", dtype)
        if f.bit is not None and f.bit >= width:
            raise ValueError(f"fault.bit: expected 0 <= bit < {width} at site {f.site!r}, got {f.bit}")
        if f.step is not None and f.step >= P:
            raise ValueError(f"fault.step: expected 0 <= step < {P} (the devices of the ring), got {f.step}")
        if f.replica == 1 and "softmax_dmr" not in checks:
            raise ValueError("fault.replica: expected 0, because this scheme computes one softmax, got 1")
        local = list(f.index)
        if RING_SITE_AXES[f.site] == "BKSH":
            chunk = f.index[2] // Sc
            device, step = (chunk + f.step) % P, f.step
            local[2] -= chunk * Sc
        else:
            device = f.index[2] // Tc
            local[2] -= device * Tc
            step = f.step
            if f.site in _IMPLIED_STEP:
                chunk = f.index[3] // Sc
                implied = (device - chunk) % P
                if step is not None and step != implied:
                    raise ValueError(f"fault.step: key {f.index[3]} is in chunk {chunk}, which device {device} "
                                     f"reads at step {implied}, got step={step}")
                step = implied
                local[3] -= chunk * Sc
        core = (spec_faults.SITES.index(f.site) if f.site in BLOCK_SITES or (
            implementation in FUSED_BACKWARD and f.site in spec_faults.BACKWARD_SITES) else -1)
        rows.append((device, step, RING_SITES.index(f.site), core, f.replica, (local + [-1])[:4],
                     0 if f.bit is not None else 1, f.bit or 0, 0.0 if f.value is None else float(f.value)))
    col = list(zip(*rows))
    i32 = lambda x: np.asarray(x, np.int32)  # noqa: E731
    return RingPlan(i32(col[0]), i32(col[1]), i32(col[2]), i32(col[3]), i32(col[4]), i32(col[5]).reshape(-1, 4),
                    i32(col[6]), i32(col[7]), np.asarray(col[8], np.float64))


class RingReport(NamedTuple):
    """What the checks of one ring call found.

    * ``detected``: bool scalar, any check anywhere (or a non-finite input);
    * ``blocks``: a ``Report`` of the blocks' row checks, each ``(B, N, T)`` over the global rows
      (sharded like the query rows): per row, the residual and threshold of the step with the
      largest ratio, flagged if any step flagged;
    * ``ring``: ``RING_CHECKS`` name → ``CheckResult``: ``lse``, ``weights``, ``merge`` per row
      ``(B, N, T)``; ``key``, ``value`` per ``(device, b, kv head)``, ``(P, B, K)``;
    * ``steps``: bool ``(P, P)``, device × step: where a block, its log-sum-exp, its merge, or the
      chunk it read was flagged (the final check of the running log-sum-exp is not per step).
    """

    detected: Any
    blocks: Any
    ring: Mapping[str, Any]
    steps: Any

    def summary(self) -> dict:
        """The report as Python scalars: the blocks' summary, per ring check the flagged count, and
        the flagged (device, step) pairs."""
        out = self.blocks.summary()
        out["detected"] = bool(self.detected)
        out["ring"] = {n: int(np.sum(np.asarray(c.flagged))) for n, c in self.ring.items()}
        out["steps"] = [tuple(int(x) for x in p) for p in np.argwhere(np.asarray(self.steps))]
        return out
