"""Shared fixtures: backend adapters, input distributions, shapes with distinct axes.

Arrays are generated in the logical layout ``BNTH`` (query) / ``BKSH`` (key,
value) and converted by each backend adapter into that backend's layout.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import sys

# The Triton kernels (implementation="triton") run in Triton's interpreter when
# the torch tests run on the CPU; the variable must be set before anything
# imports triton.
if os.environ.get("FTATTN_TEST_TORCH_DEVICE", "cpu") != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from compare import backends as adapters

HAVE_JAX = importlib.util.find_spec("jax") is not None
HAVE_TORCH = importlib.util.find_spec("torch") is not None

from ftattn_spec.faults import additive_plan
from ftattn_spec.inputs import DISTRIBUTIONS, draw_qkv  # noqa: F401  (re-exported for the tests)

DTYPES = ("float16", "bfloat16", "float32")

# Every axis a different size, so a swapped axis fails: B, N, K, T, S, H.
SHAPE = dict(B=3, N=6, K=2, T=37, S=41, H=16)
SHAPE_MHA = dict(B=3, N=5, K=5, T=37, S=41, H=16)


def assert_distinct_axes(shape: dict, name: str) -> None:
    """Every axis of ``shape`` a different size, so that a swap of any two axes (the batch and the
    kv heads of key/value, say) changes a shape and fails. ``N == K`` only where the shape is
    multi-head on purpose (``K`` is then ``N``; the other axes still differ from both)."""
    sizes = [shape[a] for a in "BTSH"] + [shape["N"]] + ([shape["K"]] if shape["K"] != shape["N"] else [])
    assert len(set(sizes)) == len(sizes), f"{name}: axes of equal size in {shape}"
    assert shape["N"] % shape["K"] == 0, f"{name}: K must divide N in {shape}"


def _check_test_shapes() -> None:
    from compare.faults import DEFAULT_SHAPE

    from .fused_cases import CASES
    from .fused_cases import SHAPE as FUSED_SHAPE

    assert_distinct_axes(SHAPE, "conftest.SHAPE")
    assert SHAPE["N"] != SHAPE["K"], "conftest.SHAPE must be grouped-query"
    assert_distinct_axes(SHAPE_MHA, "conftest.SHAPE_MHA")
    assert_distinct_axes(FUSED_SHAPE, "fused_cases.SHAPE")
    assert FUSED_SHAPE["N"] != FUSED_SHAPE["K"], "fused_cases.SHAPE must be grouped-query"
    for case in CASES:
        assert_distinct_axes({**FUSED_SHAPE, **{a: case[a] for a in "BNKTSH" if a in case}}, f"fused case {case}")
    assert_distinct_axes(DEFAULT_SHAPE, "compare.faults.DEFAULT_SHAPE")


_check_test_shapes()


def _plan(perturb):
    """``(site, index, delta)`` → a private additive FaultPlan (``probs_replica`` is replica 1)."""
    if perturb is None:
        return None
    site, index, delta = perturb
    replica = 1 if site == "probs_replica" else 0
    return additive_plan("probs" if replica else site, index, float(delta), replica)


class JaxBackend(adapters.JaxBackend):
    def perturbed(self, q, k, v, perturb, *, scheme="full", granularity="vector", is_causal=False,
                  on_fault="report"):
        """Run a scheme with ``delta`` added at one logical element of a site (private hook)."""
        from ftattn_jax.unfused import core
        from ftattn_spec.schemes import SCHEMES

        return core.run(q, k, v, checks=SCHEMES[scheme].checks, granularity=granularity, scale=q.shape[-1] ** -0.5,
                        is_causal=is_causal, on_fault=on_fault, plan=_plan(perturb))


class TorchBackend(adapters.TorchBackend):
    def __init__(self):
        super().__init__(device=os.environ.get("FTATTN_TEST_TORCH_DEVICE", "cpu"))

    def perturbed(self, q, k, v, perturb, *, scheme="full", granularity="vector", is_causal=False,
                  on_fault="report"):
        from ftattn_torch.unfused import core
        from ftattn_spec.schemes import SCHEMES

        return core.run(q, k, v, checks=SCHEMES[scheme].checks, granularity=granularity, scale=q.shape[-1] ** -0.5,
                        is_causal=is_causal, on_fault=on_fault, plan=_plan(perturb))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module.

    Every XLA:CPU executable holds its JIT code in memory mappings of its own
    (about 190 for one ``full`` call), and they live as long as the caches
    do: the whole suite in one process passed the kernel's limit of 65,530
    mappings (``vm.max_map_count``), and XLA's compiler crashed with a
    segmentation fault in whichever test came next. Clearing after each module
    keeps the count to one module's programs.
    """
    yield
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
    gc.collect()


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


# ---- the cases CI leaves to -m slow (tests/slow_cases.txt)

_SLOW_CASES = os.path.join(os.path.dirname(__file__), "slow_cases.txt")


def _slow_cases() -> set[str]:
    with open(_SLOW_CASES, encoding="utf-8") as f:
        return {line.strip() for line in f if line.strip() and not line.startswith("#")}


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    """Mark the cases of ``tests/slow_cases.txt`` slow. On a run of the whole folder, refuse a
    line that names no collected case, and one that would leave a test function no case in CI."""
    listed = _slow_cases()
    by_id = {item.nodeid: item for item in items}
    for nodeid in listed & by_id.keys():
        by_id[nodeid].add_marker(pytest.mark.slow)
    whole = [os.path.normpath(os.path.join(str(config.invocation_params.dir), a)) for a in config.args] == [
        os.path.dirname(__file__)]
    if not whole:
        return
    stale = sorted(listed - by_id.keys())
    if stale:
        raise pytest.UsageError(f"tests/slow_cases.txt names cases that were not collected: {stale[:5]}")
    kept = {item.nodeid.split("[")[0] for item in items if item.get_closest_marker("slow") is None}
    bare = sorted({n.split("[")[0] for n in listed} - kept)
    if bare:
        raise pytest.UsageError(f"tests/slow_cases.txt leaves these tests no case in CI: {bare[:5]}")
