"""Seeded property tests through the public API: on clean inputs of any shape,
dtype and distribution, no check flags and the output is within its bound.

Each case draws a shape (prime lengths, T = 1, S = 1, T ≠ S, grouped kv heads),
a dtype, a distribution (the benchmark ones and the extremes of
``ftattn_spec.inputs.STRESS_DISTRIBUTIONS``: magnitudes near the float16
maximum, float16 subnormals, Student-t tails), a scheme, a granularity and the
causal flag (and, for the unfused paths, a mask form: boolean mask, additive
bias, a ``finfo.min`` bias, sequence lengths or a local window), runs it in one backend and implementation, and compares with the
float64 reference. The default run is small enough for CI; ``-m slow`` runs
``FUZZ_SLOW_CASES`` more per backend. A failure prints the case, which
reproduces it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from ftattn_spec import reference as ref
from ftattn_spec.inputs import ALL_DISTRIBUTIONS, draw_qkv
from ftattn_spec.schemes import SCHEME_NAMES
from ftattn_spec.implementations import lookup
from ftattn_spec.implementations import run_checks as implementation_checks

FUSED_DTYPES, FUSED_HEAD_DIMS = lookup("torch", "triton").dtypes, lookup("torch", "triton").head_dims

from compare import backends as adapters

from .conftest import DTYPES, HAVE_JAX, HAVE_TORCH

FUZZ_CASES = 14  # per backend and implementation, in CI
FUZZ_SLOW_CASES = 120
FUSED = {"jax": "pallas", "torch": "triton"}
MASK_FORMS = ("none", "mask", "bias", "bias_min", "lengths", "window")


def draw_masks(case: dict) -> tuple[dict, dict]:
    """``(reference arguments, API arguments)`` of the case's mask form, drawn from its seed."""
    rng = np.random.default_rng(case["seed"] + 7919)
    B, N, T, S = (case[a] for a in "BNTS")
    form = case["masking"]
    if form == "mask":
        m = rng.random((B, 1, T, S)) < 0.7
        return dict(mask=m), dict(mask=m)
    if form in ("bias", "bias_min"):
        b = rng.standard_normal((1, N, T, S)).astype(np.float32)
        if form == "bias_min":
            b = np.where(rng.random(b.shape) < 0.3, np.finfo(np.float32).min, b).astype(np.float32)
        return dict(bias=b), dict(bias=b)
    if form == "lengths":
        ql, kl = rng.integers(1, T + 1, B).astype(np.int32), rng.integers(1, S + 1, B).astype(np.int32)
        return dict(query_lengths=ql, key_lengths=kl), dict(query_seq_lengths=ql, key_value_seq_lengths=kl)
    if form == "window":
        w = (int(rng.integers(0, 4)), int(rng.integers(0, 4)))
        return dict(window=w), dict(local_window_size=w)
    return {}, {}


def draw_case(seed: int, implementation: str) -> dict:
    """One random case; fused implementations get the dtypes, head dims and
    schemes they support (everything else is the unfused path's)."""
    rng = np.random.default_rng(seed)
    fused = implementation != "unfused"
    K = int(rng.choice([1, 2]))
    case = dict(
        B=int(rng.choice([1, 2])), K=K, N=K * int(rng.choice([1, 3])),
        T=int(rng.choice([1, 2, 7, 13, 31])), S=int(rng.choice([1, 3, 11, 17, 29])),
        H=int(rng.choice(FUSED_HEAD_DIMS[:2] if fused else (8, 16, 24))),
        dtype=str(rng.choice(FUSED_DTYPES if fused else DTYPES)),
        dist=str(rng.choice(ALL_DISTRIBUTIONS)),
        granularity=str(rng.choice(["vector", "global"])),
        is_causal=bool(rng.random() < 0.3),
        # the unfused paths also take every mask form; "bias_min" is the Hugging Face
        # style additive mask (finfo.min at masked keys)
        masking=str(rng.choice(MASK_FORMS)) if not fused else "none",
        seed=seed,
    )
    # the edges every run must reach, whatever the generator draws
    case["dist"] = ALL_DISTRIBUTIONS[seed % len(ALL_DISTRIBUTIONS)]
    if seed % 5 == 1:
        case["T"] = 1
    elif seed % 5 == 2:
        case["S"] = 1
    schemes = [s for s in SCHEME_NAMES if _runs(implementation, s)]
    case["scheme"] = str(rng.choice(schemes))
    return case


def _runs(implementation: str, scheme: str) -> bool:
    try:
        implementation_checks(implementation, scheme)
    except ValueError:
        return False
    return True


_backends: dict = {}


def _backend(name: str, implementation: str):
    key = (name, implementation)
    if key not in _backends:
        _backends[key] = adapters.JaxBackend(implementation) if name == "jax" else adapters.TorchBackend(
            os.environ.get("FTATTN_TEST_TORCH_DEVICE", "cpu"), implementation)
    return _backends[key]


def check_case(name: str, implementation: str, case: dict) -> None:
    bk = _backend(name, implementation)
    dims = [case[a] for a in "BNKTSH"]
    q, k, v = (bk.array(x, case["dtype"]) for x in draw_qkv(case["seed"], case["dist"], *dims))
    assert tuple(bk.logical(q).shape) == (case["B"], case["N"], case["T"], case["H"])
    # pallas: compiled on a GPU, Pallas' interpret mode elsewhere (the API's default)
    ref_masks, api_masks = draw_masks(case)
    kw = dict(scheme=case["scheme"], granularity=case["granularity"], is_causal=case["is_causal"], **api_masks)
    out, report = bk.attention(q, k, v, **kw)
    report = bk.numpy_report(report)
    ql, kl, vl = (bk.logical(x) for x in (q, k, v))
    assert bool(report.inputs_finite), case
    flagged = {n: int(np.sum(c.flagged)) for n, c in report.checks.items()}
    assert not bool(report.detected), f"false positive {flagged} in {case}"
    o64, p, _ = ref.attention(ql, kl, vl, is_causal=case["is_causal"], layout="torch", **ref_masks)
    bound = ref.output_bound(ql, kl, vl, p, o64, dtype=case["dtype"], is_causal=case["is_causal"], layout="torch",
                             **ref_masks)
    err = np.abs(bk.logical(out) - o64)
    assert np.isfinite(err).all(), f"non-finite output in {case}"
    worst = float(np.max(err / bound))
    assert worst <= 1.0, f"output error {worst:.3g} x its bound in {case}"


def _params(n: int, first: int):
    out = []
    for name, have in (("jax", HAVE_JAX), ("torch", HAVE_TORCH)):
        skip = pytest.mark.skipif(not have, reason=f"{name} is not installed")
        for implementation in ("unfused", FUSED[name]):
            count = n if implementation == "unfused" else max(2, n // 3)
            out += [pytest.param(name, implementation, first + i, marks=skip, id=f"{name}-{implementation}-{first + i}")
                    for i in range(count)]
    return out


@pytest.mark.parametrize("name,implementation,seed", _params(FUZZ_CASES, 0))
def test_no_false_positive_and_output_within_bound(name, implementation, seed):
    if implementation == "triton":
        pytest.importorskip("triton")
    check_case(name, implementation, draw_case(seed, implementation))


@pytest.mark.slow
@pytest.mark.parametrize("name,implementation,seed", _params(FUZZ_SLOW_CASES, 10_000))
def test_no_false_positive_and_output_within_bound_slow(name, implementation, seed):
    if implementation == "triton":
        pytest.importorskip("triton")
    check_case(name, implementation, draw_case(seed, implementation))


def test_cases_cover_the_edges():
    """The CI cases include T = 1, S = 1, T ≠ S, grouped heads and every extreme distribution."""
    cases = [draw_case(s, "unfused") for s in range(FUZZ_CASES)] + \
        [draw_case(s, FUSED["jax"]) for s in range(max(2, FUZZ_CASES // 3))]
    assert any(c["T"] == 1 for c in cases) and any(c["S"] == 1 for c in cases)
    assert any(c["T"] != c["S"] for c in cases) and any(c["N"] > c["K"] for c in cases)
    assert {c["dist"] for c in cases} == set(ALL_DISTRIBUTIONS)
    assert len({c["masking"] for c in cases}) >= 4
