"""Every scheme, in both backends: output against float64, clean verdicts, report layout."""

from __future__ import annotations

import numpy as np
import pytest

from ftattn_spec import reference as ref
from ftattn_spec.report import CHECK_FIELDS, REPORT_FIELDS
from ftattn_spec.schemes import CHECK_ORIENTATION, SCHEME_NAMES, SCHEMES

from .inputs import scheme_params
from .conftest import DISTRIBUTIONS, DTYPES, SHAPE, SHAPE_MHA, draw_qkv


def run_case(backend, dtype, dist, seed, shape=SHAPE, **kw):
    qn, kn, vn = draw_qkv(seed, dist, **shape)
    q, k, v = (backend.array(x, dtype) for x in (qn, kn, vn))
    out, report = backend.attention(q, k, v, **kw)
    # The reference sees the inputs as rounded to ``dtype``.
    ql, kl, vl = (backend.logical(x) for x in (q, k, v))
    return (ql, kl, vl), backend.logical(out), backend.numpy_report(report)


def assert_output_close(inputs, out, dtype, scale=None, is_causal=False):
    q, k, v = inputs
    o64, p, _ = ref.attention(q, k, v, scale=scale, is_causal=is_causal, layout="torch")
    bound = ref.output_bound(q, k, v, p, o64, dtype=dtype, scale=scale, is_causal=is_causal, layout="torch")
    err = np.abs(out - o64)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), f"error {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"
    # The bound must not be vacuous: a visibly wrong output (bound-sized shift
    # of a whole row, 4x over) fails it.
    assert not np.all(np.abs(out + 4 * bound.max() - o64) <= bound)


def assert_clean(report, scheme, granularity, shape):
    assert tuple(report._fields) == REPORT_FIELDS
    assert set(report.checks) == set(SCHEMES[scheme].checks)  # jax pytrees sort dict keys
    assert report.detected.shape == () and report.detected.dtype == bool
    assert bool(report.inputs_finite)
    B, N = shape["B"], shape["N"]
    length = {"row": shape["T"], "col": shape["S"], "head": shape["H"]}
    for name, c in report.checks.items():
        assert tuple(c._fields) == CHECK_FIELDS
        want = (B, N) if granularity == "global" else (B, N, length[CHECK_ORIENTATION[name]])
        for field in c:
            assert field.shape == want, (name, field.shape, want)
        assert c.residual.dtype == np.float32 and c.threshold.dtype == np.float32
        ratio = np.max(c.residual / np.maximum(c.threshold, 1e-38))
        assert not c.flagged.any(), f"{name}: clean run flagged, worst residual/threshold {ratio:.3g}"
        assert np.all(c.threshold > 0) or name == "qk_col"  # causal columns nobody attends have 0
    assert not bool(report.detected)
    both = {"scores": ("qk_row", "qk_col"), "out": ("pv_row", "pv_col")}
    want_located = {g for g, (r, c) in both.items() if granularity == "vector" and {r, c} <= set(report.checks)}
    assert set(report.located) == want_located
    for loc in report.located.values():
        assert loc.shape == (B, N, 2) and loc.dtype == np.int32 and np.all(loc == -1)
    assert report.corrected.shape == () and int(report.corrected) == 0


@pytest.mark.parametrize("scheme", scheme_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_causal", [False, True])
def test_scheme_matches_float64(backend, scheme, dtype, is_causal):
    for granularity, shape in (("vector", SHAPE), ("global", SHAPE_MHA)):
        inputs, out, report = run_case(backend, dtype, "normal", seed=hash((scheme, dtype, is_causal)) % 2**31,
                                       shape=shape, scheme=scheme, granularity=granularity,
                                       is_causal=is_causal)
        assert out.shape == (shape["B"], shape["N"], shape["T"], shape["H"])
        assert_output_close(inputs, out, dtype, is_causal=is_causal)
        assert_clean(report, scheme, granularity, shape)


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("granularity", ["vector", "global"])
def test_no_false_positives(backend, dist, dtype, is_causal, granularity):
    """``full`` runs every check; fresh inputs of each distribution must pass all of them."""
    for seed in range(3):
        inputs, out, report = run_case(backend, dtype, dist, seed=1000 + seed, scheme="full",
                                       granularity=granularity, is_causal=is_causal)
        assert_clean(report, "full", granularity, SHAPE)
        assert_output_close(inputs, out, dtype, is_causal=is_causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_false_positives_longer_rows(backend, dtype):
    """Rows longer than the MMA group and T != S, to exercise the √n and n/16 terms."""
    shape = dict(B=1, N=2, K=1, T=200, S=333, H=64)
    for dist in ("uniform", "outliers", "constant"):
        for is_causal in (False, True):
            inputs, out, report = run_case(backend, dtype, dist, seed=7, shape=shape, scheme="full",
                                           is_causal=is_causal)
            assert_clean(report, "full", "vector", shape)
            assert_output_close(inputs, out, dtype, is_causal=is_causal)


def test_scale_and_schemes_agree(backend):
    """A custom scale is honoured, and every scheme returns baseline's output."""
    qn, kn, vn = draw_qkv(3, "normal", **SHAPE)
    q, k, v = (backend.array(x, "float32") for x in (qn, kn, vn))
    outs = {s: backend.logical(backend.attention(q, k, v, scheme=s, scale=0.37)[0]) for s in SCHEME_NAMES}
    o64, _, _ = ref.attention(qn, kn, vn, scale=0.37, layout="torch")
    for s, o in outs.items():
        np.testing.assert_allclose(o, o64, atol=1e-5, rtol=1e-5, err_msg=s)
        np.testing.assert_allclose(o, outs["baseline"], atol=1e-6, rtol=1e-6, err_msg=s)
    # the default scale differs from 0.37 and gives a different answer
    default = backend.logical(backend.attention(q, k, v, scheme="baseline")[0])
    assert np.abs(default - outs["baseline"]).max() > 1e-3


def test_thresholds_follow_the_model(backend):
    """Backend thresholds equal coefficient × float64 magnitude from the reference."""
    from ftattn_spec import tolerances as tol

    shape = SHAPE
    for is_causal in (False, True):
        inputs, _, report = run_case(backend, "float32", "normal", seed=11, scheme="full", is_causal=is_causal)
        mags = ref.magnitudes(*inputs, is_causal=is_causal, layout="torch")
        H, T, S = shape["H"], shape["T"], shape["S"]
        coef = {
            "qk_row": tol.qk_coefficient(S, H, "float32"),
            "qk_col": tol.qk_coefficient(T, H, "float32"),
            "pv_row": tol.pv_coefficient(S, H, "float32"),
        }
        for name, c in coef.items():
            np.testing.assert_allclose(report.checks[name].threshold, c * mags[name], rtol=1e-4, atol=1e-30,
                                       err_msg=name)
        dmr = tol.dmr_threshold(S) + 2.0 * np.expm1(2.0 * tol.dmr_logit_coefficient() * mags["logits"])
        np.testing.assert_allclose(report.checks["softmax_dmr"].threshold, dmr, rtol=1e-6)
        # the data-free bound holds: E_i <= ln S on every row
        assert np.all(mags["softmax_dmr"] <= np.log(S))


def test_thresholds_grow_with_sequence_length():
    from ftattn_spec import tolerances as tol

    cs = [tol.qk_coefficient(n, 128, "float16") for n in (512, 1024, 2048, 4096, 8192)]
    assert all(a < b for a, b in zip(cs, cs[1:]))
    assert tol.gamma(1) > 0 and tol.gamma(4096) < 2e-4 and tol.blocked_gamma(4096) < 2e-5


@pytest.mark.parametrize("preset_name", ["cpu", "warmup"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_presets_run_clean(backend, preset_name, dtype):
    """The CPU-sized presets, every scheme's checks (``full``), fresh inputs: nothing flagged.

    The GPU-sized presets are covered by ``python -m compare.calibrate`` on a GPU
    (docs/tolerances.md); thresholds are per row, so they depend on T, S and H only.
    """
    from ftattn_spec.shapes import preset

    for i, shape in enumerate(preset(preset_name)):
        dims = dict(B=shape.B, N=shape.N, K=shape.kv_heads, T=shape.T, S=shape.S, H=shape.H)
        for dist in ("uniform", "outliers"):
            inputs, out, report = run_case(backend, dtype, dist, seed=500 + i, shape=dims, scheme="full")
            assert_clean(report, "full", "vector", dims)
