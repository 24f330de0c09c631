"""Shared fixtures: backend adapters, input distributions, shapes with distinct axes.

Arrays are generated in the logical layout ``BNTH`` (query) / ``BKSH`` (key,
value) and converted by each backend adapter into that backend's layout.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from ftattn_spec.report import CheckResult, Report

HAVE_JAX = importlib.util.find_spec("jax") is not None
HAVE_TORCH = importlib.util.find_spec("torch") is not None

DTYPES = ("float16", "bfloat16", "float32")
DISTRIBUTIONS = ("uniform", "normal", "large", "outliers", "constant")

# Every axis a different size, so a swapped axis fails: B, N, K, T, S, H.
SHAPE = dict(B=3, N=6, K=3, T=37, S=41, H=16)
SHAPE_MHA = dict(B=3, N=5, K=5, T=37, S=41, H=16)


def draw(rng: np.random.Generator, shape, dist: str) -> np.ndarray:
    """Random float64 values of one distribution, shaped ``shape`` (last axis H)."""
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
    raise ValueError(dist)


def draw_qkv(seed: int, dist: str, B, N, K, T, S, H):
    rng = np.random.default_rng(seed)
    return draw(rng, (B, N, T, H), dist), draw(rng, (B, K, S, H), dist), draw(rng, (B, K, S, H), dist)


class JaxBackend:
    name = "jax"

    def __init__(self):
        import jax
        import jax.numpy as jnp

        import ftattn_jax

        self.jax, self.jnp, self.mod = jax, jnp, ftattn_jax

    def array(self, x: np.ndarray, dtype: str):
        """Logical BNTH/BKSH numpy → backend layout BTNH/BSKH in ``dtype``."""
        return self.jnp.asarray(x.transpose(0, 2, 1, 3), dtype=dtype)

    def logical(self, a) -> np.ndarray:
        return np.asarray(a.astype(self.jnp.float32), dtype=np.float64).transpose(0, 2, 1, 3)

    def attention(self, q, k, v, **kw):
        return self.mod.attention(q, k, v, **kw)

    def perturbed(self, q, k, v, perturb, *, scheme="full", granularity="vector", is_causal=False):
        """Run the scheme with ``delta`` added at one logical element of a site (private hook)."""
        from ftattn_jax import core

        return core.run(q, k, v, scheme=scheme, granularity=granularity, scale=q.shape[-1] ** -0.5,
                        is_causal=is_causal, perturb=perturb)

    def numpy_report(self, report: Report) -> Report:
        return self.jax.tree.map(np.asarray, report)


class TorchBackend:
    name = "torch"

    def __init__(self):
        import torch

        import ftattn_torch

        self.torch, self.mod = torch, ftattn_torch

    def array(self, x: np.ndarray, dtype: str):
        return self.torch.tensor(x, dtype=self.torch.float64).to(getattr(self.torch, dtype))

    def logical(self, a) -> np.ndarray:
        return a.detach().to(self.torch.float64).cpu().numpy()

    def attention(self, q, k, v, **kw):
        return self.mod.attention(q, k, v, **kw)

    def perturbed(self, q, k, v, perturb, *, scheme="full", granularity="vector", is_causal=False):
        from ftattn_torch import core

        return core.run(q, k, v, scheme=scheme, granularity=granularity, scale=q.shape[-1] ** -0.5,
                        is_causal=is_causal, perturb=perturb)

    def numpy_report(self, report: Report) -> Report:
        conv = lambda t: t.detach().cpu().numpy()
        return Report(conv(report.detected),
                      {n: CheckResult(*(conv(x) for x in c)) for n, c in report.checks.items()},
                      conv(report.inputs_finite))


BACKENDS = [
    pytest.param("jax", marks=pytest.mark.skipif(not HAVE_JAX, reason="jax is not installed")),
    pytest.param("torch", marks=pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed")),
]

_cache: dict = {}


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param not in _cache:
        _cache[request.param] = JaxBackend() if request.param == "jax" else TorchBackend()
    return _cache[request.param]


def get_backend(name: str):
    if name not in _cache:
        _cache[name] = JaxBackend() if name == "jax" else TorchBackend()
    return _cache[name]
