"""JAX and PyTorch compute the same function and reach the same verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from ftattn_spec import reference as ref

from .conftest import HAVE_JAX, HAVE_TORCH, SHAPE, draw_qkv, get_backend
from .inputs import scheme_params

pytestmark = pytest.mark.skipif(not (HAVE_JAX and HAVE_TORCH), reason="needs jax and torch")


@pytest.mark.parametrize("scheme", scheme_params())
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("granularity", ["vector", "global"])
def test_backends_agree(scheme, dtype, is_causal, granularity):
    jb, tb = get_backend("jax"), get_backend("torch")
    qn, kn, vn = draw_qkv(abs(hash((scheme, dtype, is_causal))) % 2**31, "uniform", **SHAPE)
    kw = dict(scheme=scheme, granularity=granularity, is_causal=is_causal)
    oj, rj = jb.attention(*(jb.array(x, dtype) for x in (qn, kn, vn)), **kw)
    ot, rt = tb.attention(*(tb.array(x, dtype) for x in (qn, kn, vn)), **kw)
    oj, ot, rj, rt = jb.logical(oj), tb.logical(ot), jb.numpy_report(rj), tb.numpy_report(rt)

    q, k, v = (tb.logical(tb.array(x, dtype)) for x in (qn, kn, vn))
    o64, p, _ = ref.attention(q, k, v, is_causal=is_causal, layout="torch")
    bound = ref.output_bound(q, k, v, p, o64, dtype=dtype, is_causal=is_causal, layout="torch")
    assert np.all(np.abs(oj - ot) <= 2 * bound)

    assert set(rj.checks) == set(rt.checks)
    assert bool(rj.detected) == bool(rt.detected) is False
    for name in rj.checks:
        np.testing.assert_array_equal(rj.checks[name].flagged, rt.checks[name].flagged)
        # Same model, magnitudes summed in different orders: thresholds agree closely.
        np.testing.assert_allclose(rj.checks[name].threshold, rt.checks[name].threshold, rtol=1e-3,
                                   err_msg=name)


def test_backends_flag_the_same_perturbation():
    jb, tb = get_backend("jax"), get_backend("torch")
    qn, kn, vn = draw_qkv(77, "normal", **SHAPE)
    q_j = [jb.array(x, "float16") for x in (qn, kn, vn)]
    q_t = [tb.array(x, "float16") for x in (qn, kn, vn)]
    _, clean = jb.perturbed(*q_j, None)
    thr = jb.numpy_report(clean).checks
    for site, check, where, idx in [("scores", "qk_row", (1, 2, 5), (1, 2, 5, 7)),
                                    ("probs", "softmax_dmr", (0, 3, 9), (0, 3, 9, 2)),
                                    ("out", "pv_row", (2, 5, 36), (2, 5, 36, 15))]:
        delta = 2.0 * float(thr[check].threshold[where])
        _, rj = jb.perturbed(*q_j, (site, idx, delta))
        _, rt = tb.perturbed(*q_t, (site, idx, delta))
        for name in rj.checks:
            np.testing.assert_array_equal(jb.numpy_report(rj).checks[name].flagged,
                                          tb.numpy_report(rt).checks[name].flagged, err_msg=f"{site} {name}")


@pytest.mark.parametrize("dist", ["normal", "large", "outliers", "constant"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_backends_agree_beyond_uniform(dist, dtype):
    """Identical inputs (both adapters round through float32), T > S causal: same function."""
    jb, tb = get_backend("jax"), get_backend("torch")
    shape = dict(SHAPE, T=70, S=33)
    qn, kn, vn = draw_qkv(3, dist, **shape)
    qj = [jb.array(x, dtype) for x in (qn, kn, vn)]
    qt = [tb.array(x, dtype) for x in (qn, kn, vn)]
    for a, b in zip(qj, qt):
        np.testing.assert_array_equal(jb.logical(a), tb.logical(b))
    oj, rj = jb.attention(*qj, is_causal=True)
    ot, rt = tb.attention(*qt, is_causal=True)
    q, k, v = (tb.logical(x) for x in qt)
    o64, p, _ = ref.attention(q, k, v, is_causal=True, layout="torch")
    bound = ref.output_bound(q, k, v, p, o64, dtype=dtype, is_causal=True, layout="torch")
    assert np.all(np.abs(jb.logical(oj) - o64) <= bound)
    assert np.all(np.abs(tb.logical(ot) - o64) <= bound)
    assert not bool(rj.detected) and not bool(rt.detected)


def test_backends_agree_on_identical_fault_plans():
    """Random single-bit flips at every site: the same verdicts, flags and located indices."""
    from ftattn_spec.faults import Fault

    jb, tb = get_backend("jax"), get_backend("torch")
    qkv = draw_qkv(77, "normal", **SHAPE)
    q_j = [jb.array(x, "bfloat16") for x in qkv]
    q_t = [tb.array(x, "bfloat16") for x in qkv]
    rng = np.random.default_rng(1)
    sizes = {"scores": "BNTS", "probs": "BNTS", "out": "BNTH", "query": "BNTH", "key": "BKSH", "value": "BKSH"}
    for n in range(36):
        site = list(sizes)[n % 6]
        idx = tuple(int(rng.integers(SHAPE[a])) for a in sizes[site])
        fault = Fault(site, idx, bit=int(rng.integers(16 if site in ("query", "key", "value") else 32)))
        _, rj = jb.attention(*q_j, fault=fault)
        _, rt = tb.attention(*q_t, fault=fault)
        rj, rt = jb.numpy_report(rj), tb.numpy_report(rt)
        assert bool(rj.detected) == bool(rt.detected), fault
        for name in rj.checks:
            np.testing.assert_array_equal(rj.checks[name].flagged, rt.checks[name].flagged, err_msg=str(fault))
        for name in rj.located:
            np.testing.assert_array_equal(rj.located[name], rt.located[name], err_msg=str(fault))
