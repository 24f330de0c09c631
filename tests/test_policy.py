"""``implementation="auto"``, ``report.ran``, readable reports, the fault policy and the counters."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from ftattn_spec import implementations, policy
from ftattn_spec.faults import Fault, FaultDetected
from ftattn_spec.policy import FaultWarning

from .conftest import HAVE_JAX, HAVE_TORCH, SHAPE
from .inputs import make_qkv

needs_jax = pytest.mark.skipif(not HAVE_JAX, reason="jax is not installed")
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed")
FAULT = Fault("scores", (1, 2, 3, 4), bit=29)


@pytest.fixture(autouse=True)
def _fresh_policy():
    before = policy.set_policy("count")
    yield
    policy.set_policy(before)


# ---- the catalogue's choice


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_auto_takes_the_kernel_where_it_fits_and_says_why_not(backend):
    fused = implementations.fused_record(backend).name
    q_shape = (2, 3, 4, 64)
    ok = dict(scheme="full", dtype="bfloat16", q_shape=q_shape)
    assert implementations.choose(backend, device_reason=None, **ok) == (fused, None)
    name, why = implementations.choose(backend, device_reason="not on a GPU", **ok)
    assert (name, why) == ("unfused", "not on a GPU")
    for change, word in ((dict(dtype="float32"), "float32"), (dict(q_shape=(2, 3, 4, 24)), "H=24"),
                         (dict(scheme="abft_qk_col"), "scheme")):
        name, why = implementations.choose(backend, device_reason=None, **{**ok, **change})
        assert name == "unfused" and word in why, (change, why)


def test_fallback_warns_once_per_reason():
    reason = f"a reason only this test gives {np.random.default_rng().integers(1 << 30)}"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        implementations.warn_fallback("torch", reason)
        implementations.warn_fallback("torch", reason)
        implementations.warn_fallback("torch", reason + " (another)")
    hits = [x for x in w if issubclass(x.category, implementations.FallbackWarning)]
    assert len(hits) == 2 and reason in str(hits[0].message)
    assert hits[0].filename == __file__  # points at the caller, not at ftattn


@pytest.mark.parametrize("name", ["auto", None])
def test_auto_is_accepted_and_explicit_names_stay_strict(name):
    assert implementations.resolve("torch", name) == "auto"
    with pytest.raises(ValueError, match="implementation: expected one of"):
        implementations.resolve("jax", "cudnn")


# ---- per backend: what ran, readable reports, the policy, the counters


def _torch_inputs():
    return make_qkv(3, framework="torch", dtype="float32")


def _jax_inputs():
    return make_qkv(3, framework="jax", dtype="float32")


@needs_torch
def test_torch_default_runs_unfused_on_cpu_and_says_so():
    import ftattn_torch

    q, k, v = _torch_inputs()
    _, rep = ftattn_torch.attention(q, k, v)
    assert rep.ran.implementation == "unfused" and "GPU" in rep.ran.fallback
    _, rep = ftattn_torch.scaled_dot_product_attention(q, k, v, enable_gqa=True, return_report=True)
    assert rep.ran.implementation == "unfused"
    _, rep = ftattn_torch.attention(q, k, v, implementation="unfused")
    assert rep.ran.implementation == "unfused" and rep.ran.fallback is None


@needs_jax
def test_jax_default_runs_unfused_on_cpu_and_says_so_under_jit():
    import jax

    import ftattn_jax

    if jax.default_backend() == "gpu":
        pytest.skip("the default takes the kernel on a GPU")
    q, k, v = _jax_inputs()
    _, rep = jax.jit(lambda q, k, v: ftattn_jax.attention(q, k, v))(q, k, v)
    assert rep.ran.implementation == "unfused" and "GPU" in rep.ran.fallback


@needs_torch
def test_torch_report_summary_and_repr():
    import ftattn_torch

    q, k, v = _torch_inputs()
    _, rep = ftattn_torch.attention(q, k, v, fault=FAULT, on_fault="correct")
    d = rep.summary()
    assert d["detected"] and d["corrected"] >= 1 and d["inputs_finite"]
    assert d["checks"]["qk_row"]["flagged"] == 1 and d["checks"]["qk_row"]["worst_ratio"] > 1
    assert d["checks"]["pv_row"]["flagged"] == 0 and d["checks"]["pv_row"]["worst_ratio"] < 1
    assert d["located"]["scores"] == 1 and d["implementation"] == "unfused"
    assert all(isinstance(x, (bool, int, float, str, type(None), dict)) for x in d.values())
    text = repr(rep)
    assert text.startswith("Report(detected=True") and "qk_row: 1 flagged" in text and "corrected=" in text
    assert rep.to_dict() == d


@needs_jax
def test_jax_report_repr_traced_and_concrete():
    import jax

    import ftattn_jax

    q, k, v = _jax_inputs()
    _, rep = ftattn_jax.attention(q, k, v)
    assert "detected=False" in repr(rep) and rep.summary()["checks"]["qk_col"]["flagged"] == 0
    seen = []
    jax.jit(lambda q: seen.append(repr(ftattn_jax.attention(q, k, v)[1])) or q)(q)
    assert "traced" in seen[0]


@needs_torch
def test_torch_policy_on_calls_that_drop_the_report():
    import torch

    import ftattn_torch

    q, k, v = _torch_inputs()
    sdpa = lambda **kw: ftattn_torch.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)  # noqa: E731
    ftattn_torch.counters.reset()
    clean = sdpa()
    out = sdpa(fault=FAULT, site="layer-a")  # "count": the output changes silently, the counter does not
    assert not torch.equal(out, clean)
    counts = ftattn_torch.counters.read()
    assert counts["layer-a"] == {"detected": 1, "calls": 1} and ftattn_torch.counters.detected() == 1
    with ftattn_torch.fault_policy("poison"):
        out = sdpa(fault=FAULT)
        assert bool(out[1, 2, 3].isnan().all()) and int(out.isnan().any(-1).sum()) == 1
        out, rep = sdpa(fault=FAULT, return_report=True)  # it asks for the report: left alone
        assert not bool(out.isnan().any()) and bool(rep.detected)
    with ftattn_torch.fault_policy("raise"), pytest.raises(FaultDetected):
        sdpa(fault=FAULT)
    with ftattn_torch.fault_policy("warn"), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        sdpa(fault=FAULT)
        sdpa()
    assert [x.category for x in w] == [FaultWarning] and w[0].filename == __file__
    with ftattn_torch.fault_policy("raise"):  # an explicit on_fault wins
        sdpa(fault=FAULT, on_fault="nan")
    with ftattn_torch.fault_policy("raise"), pytest.raises(FaultDetected):
        ftattn_torch.FaultTolerantAttention(enable_gqa=True)(q, k, v, fault=FAULT)
    _, rep = ftattn_torch.attention(q, k, v, fault=FAULT)  # attention returns the report: counted only
    assert policy.get_policy() == "count" and bool(rep.detected)
    with pytest.raises(ValueError, match="policy"):
        ftattn_torch.set_policy("ignore")


@needs_jax
def test_jax_policy_and_counters_under_jit():
    import jax
    import jax.numpy as jnp

    import ftattn_jax

    q, k, v = _jax_inputs()
    ftattn_jax.counters.reset()
    f = jax.jit(lambda q, k, v: ftattn_jax.dot_product_attention(q, k, v, fault=FAULT, site=7))
    f(q, k, v)
    f(q, k, v)
    assert ftattn_jax.counters.read()["layer 7"] == {"detected": 2, "calls": 2}
    with ftattn_jax.fault_policy("poison"):
        out = ftattn_jax.dot_product_attention(q, k, v, fault=FAULT)
    assert int(jnp.isnan(out).any(-1).sum()) == 1 and bool(jnp.isnan(out[1, 3, 2]).all())
    with ftattn_jax.fault_policy("raise"), pytest.raises(FaultDetected):
        ftattn_jax.dot_product_attention(q, k, v, fault=FAULT)
    with ftattn_jax.fault_policy("warn"), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ftattn_jax.dot_product_attention(q, k, v, fault=FAULT, site="warned")
        ftattn_jax.counters.read()  # waits for the callbacks
    assert any(x.category is FaultWarning and "warned" in str(x.message) for x in w)
    assert SHAPE["B"] == q.shape[0]
