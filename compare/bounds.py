"""The statistics of the fault scorecards: the outcomes a faulty run can have, and the one-sided
Clopper–Pearson upper bound on a miss rate (``compare.scorecard``, ``compare.outcome_map``,
``compare.backward_faults``). Framework-free."""

from __future__ import annotations

import math

import numpy as np

#: The outcomes of a forward campaign, in the order they are drawn.
OUTCOMES: tuple[str, ...] = ("detected", "harmless", "below_limit", "missed")
#: The outcomes of a backward campaign (``compare.backward_faults``): no detection limit there.
BACKWARD_OUTCOMES: tuple[str, ...] = ("detected", "harmless", "missed")
#: What the rates mean, written into the JSON next to them.
DEFINITIONS = {
    "mattered": "faults that mattered: every outcome except harmless (detected + below_limit + missed)",
    "detection": "detected / faults that mattered (harmless faults excluded), 95% Wilson interval",
    "miss": "missed / faults that mattered; upper95 is the one-sided 95% Clopper-Pearson upper bound "
            "on the miss rate (1 - 0.05**(1/n) when 0 of n)",
}


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), 0 < p < 1, summed in logs (no overflow at large n)."""
    lp, lq = math.log(p), math.log1p(-p)
    lg = math.lgamma
    return math.fsum(math.exp(lg(n + 1) - lg(i + 1) - lg(n - i + 1) + i * lp + (n - i) * lq) for i in range(k + 1))


def _upper_by_bisection(k: int, n: int, alpha: float) -> float:
    """The p with P(X <= k | n, p) = alpha (the CDF falls as p grows), by bisection on [k/n, 1]."""
    lo, hi = k / n, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _binom_cdf(k, n, mid) > alpha:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13:
            break
    return 0.5 * (lo + hi)


def miss_upper_bound(k: int, n: int, level: float = 0.95) -> float:
    """One-sided Clopper–Pearson upper bound at ``level`` on a rate seen ``k`` times in ``n`` trials.

    The exact bound: the largest rate p with P(X <= k | n, p) >= 1 - level, i.e. the
    ``level`` quantile of Beta(k + 1, n - k). One-sided, because the question is "how large
    can the miss rate be?": k=0 gives 1 - (1 - level)**(1/n) (n=10: 0.2589), k=1, n=10 gives
    0.3942 (the two-sided 95% interval's upper end, 0.4450, is the one-sided 97.5% bound).
    No trials (n=0) say nothing: 1.0. SciPy's Beta quantile when importable, else a bisection
    on the binomial CDF (:func:`_upper_by_bisection`; the two agree to 1e-9).
    """
    if not (isinstance(n, (int, np.integer)) and n >= 0):
        raise ValueError(f"miss_upper_bound: n expected an integer >= 0, got {n!r}")
    if not (isinstance(k, (int, np.integer)) and 0 <= k <= n):
        raise ValueError(f"miss_upper_bound: k expected an integer in 0..n={n}, got {k!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"miss_upper_bound: level expected in (0, 1), got {level!r}")
    k, n = int(k), int(n)
    alpha = 1.0 - level
    if n == 0 or k == n:
        return 1.0
    if k == 0:
        return 1.0 - alpha ** (1.0 / n)
    try:
        from scipy.stats import beta
    except ImportError:
        return _upper_by_bisection(k, n, alpha)
    return float(beta.ppf(level, k + 1, n - k))


def bound_text(k: int, n: int) -> str:
    """``"0 missed (≤ 9.5% at 95%)"``: a miss count with its bound among the ``n`` that mattered."""
    if n == 0:
        return f"{k} missed (no fault mattered)"
    return f"{k} missed (≤ {100 * miss_upper_bound(k, n):.3g}% at 95%)"


def outcome(result: dict) -> str:
    """The outcome (one of :data:`OUTCOMES`) of one backend's result in a campaign row."""
    if result["detected"]:
        return "detected"
    if result["harmful"] and result["beyond_limit"]:
        return "missed"
    if result["harmful"]:
        return "below_limit"
    return "harmless"


def mattered(counts: dict) -> int:
    """How many faults mattered: every outcome counted in ``counts`` except harmless."""
    return sum(counts.get(c, 0) for c in OUTCOMES if c != "harmless")


def miss_rate(k: int, n: int) -> dict:
    """``k`` misses among ``n`` faults that mattered: count, rate and the 95% upper bound."""
    return {"count": k, "of": n, "rate": (k / n) if n else None, "upper95": miss_upper_bound(k, n)}
