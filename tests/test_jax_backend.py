"""JAX-specific behaviour: jit without retracing, vmap, and redundancy that survives XLA."""

from __future__ import annotations

import re

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

import ftattn_jax  # noqa: E402
from ftattn_jax.unfused import core  # noqa: E402

from .conftest import SHAPE  # noqa: E402
from .inputs import make_qkv  # noqa: E402


def _inputs(seed, dtype="float16", shape=SHAPE):
    return make_qkv(seed, "normal", framework="jax", dtype=dtype, shape=shape)


def count_exponentials(hlo_text: str) -> int:
    """Exponential instructions in optimised HLO text (inside fusions included)."""
    return len(re.findall(r"\bexponential\(", hlo_text))


def compiled_hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


@pytest.mark.parametrize("scheme", ["dmr_softmax", "full"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_dmr_keeps_two_softmax_replicas_after_compilation(scheme, is_causal):
    q, k, v = _inputs(0)
    hlo = compiled_hlo(lambda q, k, v: ftattn_jax.attention(q, k, v, scheme=scheme, is_causal=is_causal), q, k, v)
    assert count_exponentials(hlo) >= 2, "XLA merged the softmax replicas"


def test_exponential_counter_can_fail():
    """The counter sees one exponential for plain attention and for the naive DMR
    (two identical softmaxes, which XLA merges): the HLO test above can fail."""
    q, k, v = _inputs(0)
    assert count_exponentials(compiled_hlo(lambda q, k, v: ftattn_jax.attention(q, k, v, scheme="baseline"),
                                           q, k, v)) == 1

    def naive_dmr(s):
        a, b = jax.nn.softmax(s), jax.nn.softmax(s)
        return a, jnp.abs(a - b).sum()

    assert count_exponentials(compiled_hlo(naive_dmr, jnp.ones((4, 8)))) == 1


def test_no_retrace_for_same_shape():
    traces = []

    @jax.jit
    def f(q, k, v):
        traces.append(1)
        return ftattn_jax.attention(q, k, v)

    before = core._run._cache_size()
    for seed in range(3):
        out, rep = f(*_inputs(seed))
        out.block_until_ready()
        ftattn_jax.attention(*_inputs(seed + 10))  # the un-wrapped API, same shape
    assert len(traces) == 1
    assert core._run._cache_size() - before <= 2  # one for f's trace, one for direct calls


def test_direct_calls_share_one_compilation():
    before = core._run._cache_size()
    for seed in range(4):
        ftattn_jax.attention(*_inputs(100 + seed, shape=dict(SHAPE, T=29)), scheme="abft_qk_row")
    assert core._run._cache_size() - before == 1


def test_vmap_over_extra_leading_axis():
    qs, ks, vs = zip(*(_inputs(s, "float32") for s in range(3)))
    q, k, v = jnp.stack(qs), jnp.stack(ks), jnp.stack(vs)
    out, rep = jax.vmap(lambda q, k, v: ftattn_jax.attention(q, k, v, is_causal=True))(q, k, v)
    assert out.shape == (3,) + qs[0].shape
    assert rep.detected.shape == (3,)
    assert rep.checks["qk_col"].flagged.shape == (3, SHAPE["B"], SHAPE["N"], SHAPE["S"])
    for i in range(3):
        o, r = ftattn_jax.attention(qs[i], ks[i], vs[i], is_causal=True)
        np.testing.assert_allclose(np.asarray(out[i]), np.asarray(o), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(rep.checks["pv_row"].threshold[i]),
                                   np.asarray(r.checks["pv_row"].threshold), rtol=1e-5)
    assert not bool(rep.detected.any())


def test_report_is_a_pytree_of_arrays():
    out, rep = ftattn_jax.attention(*_inputs(1))
    leaves = jax.tree.leaves(rep)
    assert len(leaves) == 3 + 3 * 5 + 2  # detected, inputs_finite, corrected; 5 checks; 2 located
    assert all(isinstance(x, jax.Array) for x in leaves)


def test_numpy_inputs_are_accepted():
    q, k, v = (np.asarray(x) for x in _inputs(2, "float32"))
    out, rep = ftattn_jax.attention(q, k, v)
    assert isinstance(out, jax.Array) and out.dtype == jnp.float32


@pytest.mark.parametrize("scheme", ["baseline", "full"])
def test_grad_matches_jax_attention(scheme):
    """Not yet a promise of the API (issue 6), but nothing may break it silently."""
    q, k, v = _inputs(5, "float32")

    def loss(fn):
        return lambda q, k, v: fn(q, k, v).sum()

    ours = jax.grad(loss(lambda q, k, v: ftattn_jax.attention(q, k, v, scheme=scheme, is_causal=True)[0]),
                    argnums=(0, 1, 2))(q, k, v)
    with jax.default_matmul_precision("highest"):  # no TF32 in the reference on a GPU
        ref = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)),
                       argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("n", [1, 2, 7, 16, 41, 100, 257])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_blocked_sums_match_plain_sums(n, axis):
    from ftattn_jax.unfused.checks import blocked_cumsum, blocked_sum

    x = jnp.asarray(np.moveaxis(np.random.default_rng(n).normal(size=(3, n, 5)), 1, axis), jnp.float32)
    np.testing.assert_allclose(np.asarray(blocked_sum(x, axis)), np.asarray(x.sum(axis)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(blocked_cumsum(x, axis)), np.asarray(jnp.cumsum(x, axis)),
                               rtol=1e-5, atol=1e-5)


def test_a_hundred_faults_share_one_compilation():
    """Faults are traced data: site, index, bit, value and mode change without recompiling."""
    from ftattn_spec.faults import Fault

    q, k, v = _inputs(7, shape=dict(SHAPE, T=31))
    rng = np.random.default_rng(0)
    B, N, K, S, H = (SHAPE[a] for a in "BNKSH")
    sizes = {"scores": (B, N, 31, S), "probs": (B, N, 31, S), "out": (B, N, 31, H), "query": (B, N, 31, H),
             "key": (B, K, S, H), "value": (B, K, S, H)}
    faults = []
    for n in range(100):
        site = list(sizes)[n % 6]
        idx = tuple(int(rng.integers(m)) for m in sizes[site])
        width = 16 if site in ("query", "key", "value") else 32
        faults.append(Fault(site, idx, bit=int(rng.integers(width))) if n % 3 else
                      Fault(site, idx, value=float(rng.normal()), replica=int(site == "probs" and n % 2)))
    ftattn_jax.attention(q, k, v, fault=faults[0])
    before = core._run._cache_size()
    seen = 0
    for f in faults:
        _, rep = ftattn_jax.attention(q, k, v, fault=f)
        seen += bool(rep.detected)
    assert core._run._cache_size() == before
    assert seen > 10  # the faults did land


def test_raise_under_jit_goes_through_checkify():
    from jax.experimental import checkify

    from ftattn_spec.faults import Fault

    q, k, v = _inputs(8)
    fault = Fault("out", (0, 1, 2, 3), bit=30)
    f = jax.jit(checkify.checkify(lambda q, k, v: ftattn_jax.attention(q, k, v, on_fault="raise", fault=fault)))
    err, _ = f(q, k, v)
    assert err.get() is not None and "fault was detected" in err.get()
    g = jax.jit(checkify.checkify(lambda q, k, v: ftattn_jax.attention(q, k, v, on_fault="raise")))
    err, _ = g(q, k, v)
    assert err.get() is None
    with pytest.raises(ValueError, match="checkify"):  # JAX refuses an unfunctionalized check, and says so
        jax.jit(lambda q, k, v: ftattn_jax.attention(q, k, v, on_fault="raise"))(q, k, v)


def test_correct_and_faults_under_vmap():
    from ftattn_spec.faults import Fault

    qs, ks, vs = zip(*(_inputs(s) for s in range(2)))
    q, k, v = jnp.stack(qs), jnp.stack(ks), jnp.stack(vs)
    fault = Fault("scores", (1, 2, 3, 4), bit=30)
    out, rep = jax.vmap(lambda q, k, v: ftattn_jax.attention(q, k, v, fault=fault, on_fault="correct"))(q, k, v)
    assert rep.corrected.tolist() == [1, 1]
    for i in range(2):
        clean, _ = ftattn_jax.attention(qs[i], ks[i], vs[i])
        np.testing.assert_allclose(np.asarray(out[i], np.float32), np.asarray(clean, np.float32), atol=2e-3)


def test_backward_fault_sites_are_refused_off_the_fused_path():
    """The fused backward's sites exist in the fused kernels' backward only: the unfused path says so by name."""
    import jax.numpy as jnp

    import ftattn_jax
    from ftattn_spec import Fault

    q = jnp.ones((1, 5, 2, 8), jnp.float32)
    with pytest.raises(ValueError, match="fault.site: 'bwd_dq'.*implementation='pallas'"):
        ftattn_jax.attention(q, q, q, fault=Fault("bwd_dq", (0, 0, 1, 1), bit=3), implementation="unfused")
