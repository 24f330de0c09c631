"""Named input distributions for tests and benchmarks (NumPy, framework-free).

All values are float64; callers round them to the dtype under test. The
distributions go beyond the seed notebook's uniform[-1, 1] to the inputs that
stress a tolerance model: peaky softmax, heavy-tailed outlier channels, and
constant data whose rounding errors are correlated rather than random.
"""

from __future__ import annotations

import numpy as np

DISTRIBUTIONS: tuple[str, ...] = ("uniform", "normal", "large", "outliers", "constant")

#: Extremes for the property tests (``tests/test_fuzz.py``), kept out of
#: ``DISTRIBUTIONS`` so the benchmark and fault-campaign defaults stay as
#: published: ``huge`` magnitudes near the float16 maximum (logits up to about
#: 1e10), ``tiny`` ones that fall below float16's normal range (products
#: below float32's), and ``heavy`` Student-t tails (df = 1.5, no finite variance).
STRESS_DISTRIBUTIONS: tuple[str, ...] = ("huge", "tiny", "heavy")
ALL_DISTRIBUTIONS: tuple[str, ...] = DISTRIBUTIONS + STRESS_DISTRIBUTIONS


def draw(rng: np.random.Generator, shape, dist: str) -> np.ndarray:
    """Random float64 values of distribution ``dist``, shaped ``shape`` (last axis H)."""
    if dist == "uniform":  # the seed notebook's inputs
        return rng.uniform(-1.0, 1.0, shape)
    if dist == "normal":
        return rng.standard_normal(shape)
    if dist == "large":  # large logits: a peaky softmax
        return 8.0 * rng.standard_normal(shape)
    if dist == "outliers":  # heavy tails: a few channels 100x larger, as in LLM activations
        x = rng.standard_normal(shape)
        ch = rng.choice(shape[-1], size=max(1, shape[-1] // 8), replace=False)
        x[..., ch] *= 100.0
        return x
    if dist == "constant":  # correlated rounding: every element the same inexact value
        return np.full(shape, 0.3 + 0.1 * rng.uniform())
    if dist == "huge":  # |x| in [3e4, 6e4], random signs: finite in float16, logits ~1e9·√H·scale
        return rng.choice([-1.0, 1.0], shape) * rng.uniform(3e4, 6e4, shape)
    if dist == "tiny":  # float16 subnormals, products far below float32's normal range
        return 1e-5 * rng.standard_normal(shape)
    if dist == "heavy":  # Student-t, df = 1.5, clipped to the float16 range
        return np.clip(rng.standard_t(1.5, shape), -6e4, 6e4)
    raise ValueError(f"dist: expected one of {ALL_DISTRIBUTIONS}, got {dist!r}")


def draw_qkv(seed: int, dist: str, B: int, N: int, K: int, T: int, S: int, H: int):
    """``(q, k, v)`` in the logical layout ``BNTH`` / ``BKSH``."""
    rng = np.random.default_rng(seed)
    return draw(rng, (B, N, T, H), dist), draw(rng, (B, K, S, H), dist), draw(rng, (B, K, S, H), dist)
