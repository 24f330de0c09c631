"""Fault injection, detection, localization, correction and the on_fault policies,
through the public ``attention(..., fault=..., on_fault=...)`` of both backends."""

from __future__ import annotations

import numpy as np
import pytest

from ftattn_spec import localization
from ftattn_spec import reference as ref
from ftattn_spec.faults import Fault, FaultDetected, flip_bit

from .conftest import SHAPE, draw_qkv

B, N, K, T, S, H = (SHAPE[a] for a in "BNKTSH")


def _inputs(backend, dtype="float16", dist="normal", seed=0, shape=SHAPE):
    arrays = tuple(backend.array(x, dtype) for x in draw_qkv(seed, dist, **shape))
    logical = tuple(backend.logical(x) for x in arrays)
    return arrays, logical


def _ref(logical, dtype, is_causal=False):
    o64, p, s = ref.attention(*logical, is_causal=is_causal, layout="torch")
    bound = ref.output_bound(*logical, p, o64, dtype=dtype, is_causal=is_causal, layout="torch")
    return o64, p, s, bound


def _within(out, o64, bound):
    return bool(np.all(np.abs(out - o64) <= bound))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("site", ["query", "key", "value"])
def test_input_injection_matches_numpy_flip(backend, dtype, site):
    """A flipped input bit gives exactly the output of running on the NumPy-flipped input."""
    (q, k, v), logical = _inputs(backend, dtype, seed=3)
    idx = (2, 1, 5, 7)  # b, head (query head or kv head), row, h
    bit = 14 if dtype != "float32" else 27
    fault = Fault(site, idx, bit=bit)
    out, rep = backend.attention(q, k, v, scheme="baseline", fault=fault)
    flipped = [x.copy() for x in logical]
    pos = ("query", "key", "value").index(site)
    flipped[pos][idx] = flip_bit(flipped[pos][idx], dtype, bit)
    assert flipped[pos][idx] != logical[pos][idx]
    out2, _ = backend.attention(*(backend.array(x, dtype) for x in flipped), scheme="baseline")
    np.testing.assert_array_equal(backend.logical(out), backend.logical(out2))
    np.testing.assert_array_equal(backend.logical(q), logical[0])  # the caller's input is untouched


@pytest.mark.parametrize("bit", [3, 17, 23, 30, 31])
def test_out_injection_matches_numpy_flip(backend, bit):
    """float32 output is the float32 accumulator: exactly one element changes, by the modelled flip."""
    (q, k, v), _ = _inputs(backend, "float32", seed=4)
    clean, _ = backend.attention(q, k, v, scheme="baseline")
    out, _ = backend.attention(q, k, v, scheme="baseline", fault=Fault("out", (1, 4, 30, 9), bit=bit))
    clean, out = backend.logical(clean), backend.logical(out)
    want = clean.copy()
    want[1, 4, 30, 9] = flip_bit(clean[1, 4, 30, 9], "float32", bit)
    np.testing.assert_array_equal(out, want)


def test_value_fault_sets_the_element(backend):
    (q, k, v), _ = _inputs(backend, "float32", seed=5)
    out, _ = backend.attention(q, k, v, scheme="baseline", fault=Fault("out", (0, 2, 3, 4), value=-7.25))
    assert backend.logical(out)[0, 2, 3, 4] == -7.25


@pytest.mark.parametrize("site,check", [("scores", "qk_row"), ("probs", "softmax_dmr")])
def test_injection_lands_at_the_index(backend, site, check):
    """S and P are not returned, so the landing is read from the checks: the flagged row
    and (for S) column are the injected ones, and the residual equals the change the
    NumPy flip model predicts, within the threshold."""
    (q, k, v), logical = _inputs(backend, "float16", seed=6)
    _, p, s, _ = _ref(logical, "float16")
    b, n, i, j = 2, 3, 11, 29
    x = (s if site == "scores" else p)[b, n, i, j]
    x32 = float(np.float32(x))
    delta = flip_bit(x32, "float32", 23) - x32  # lowest exponent bit: doubles or halves
    _, rep = backend.attention(q, k, v, fault=Fault(site, (b, n, i, j), bit=23))
    rep = backend.numpy_report(rep)
    c = rep.checks[check]
    assert np.argwhere(c.flagged).tolist() == [[b, n, i]]
    assert abs(c.residual[b, n, i] - abs(delta)) <= 2 * c.threshold[b, n, i] + 1e-3 * abs(delta)
    if site == "scores":
        assert np.argwhere(rep.checks["qk_col"].flagged).tolist() == [[b, n, j]]


@pytest.mark.parametrize("site", ["scores", "out"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_exponent_flips_are_detected_located_and_corrected(backend, site, dtype):
    (q, k, v), logical = _inputs(backend, dtype, seed=7)
    o64, p, s, bound = _ref(logical, dtype)
    clean, rep0 = backend.attention(q, k, v)
    rep0 = backend.numpy_report(rep0)
    rng = np.random.default_rng(hash((site, dtype)) % 2**32)
    for bit in range(23, 31):
        b, n, i = int(rng.integers(B)), int(rng.integers(N)), int(rng.integers(T))
        j = int(rng.integers(S if site == "scores" else H))
        fault = Fault(site, (b, n, i, j), bit=bit)
        x = float(np.float32((s if site == "scores" else backend.logical(clean))[b, n, i, j]))
        delta = abs(flip_bit(x, "float32", bit) - x)
        row = rep0.checks["qk_row" if site == "scores" else "pv_row"].threshold[b, n, i]
        out, rep = backend.attention(q, k, v, fault=fault)
        rep = backend.numpy_report(rep)
        if not delta > 4 * row:  # an exponent flip of a tiny element can stay tiny
            continue
        assert bool(rep.detected), (bit, x, delta)
        assert rep.located[site][b, n].tolist() == [i, j], (bit, x)
        located = np.argwhere(rep.located[site][..., 0] >= 0).tolist()
        assert located == [[b, n]]
        fixed, rep_c = backend.attention(q, k, v, fault=fault, on_fault="correct")
        assert int(backend.numpy_report(rep_c).corrected) == 1
        assert _within(backend.logical(fixed), o64, bound), (bit, x)


def test_two_faults_in_one_row_recompute_the_row(backend):
    (q, k, v), logical = _inputs(backend, "float16", seed=8)
    o64, _, _, bound = _ref(logical, "float16")
    faults = [Fault("scores", (1, 2, 10, 3), bit=30), Fault("scores", (1, 2, 10, 20), value=50.0)]
    out, rep = backend.attention(q, k, v, fault=faults)
    rep = backend.numpy_report(rep)
    assert bool(rep.detected) and np.all(rep.located["scores"] == -1)
    assert not _within(backend.logical(out), o64, bound)
    fixed, rep_c = backend.attention(q, k, v, fault=faults, on_fault="correct")
    assert int(backend.numpy_report(rep_c).corrected) == 1  # one row recomputed
    assert _within(backend.logical(fixed), o64, bound)


@pytest.mark.parametrize("replica", [0, 1])
def test_dmr_mismatch_is_settled_by_a_third_softmax(backend, replica):
    (q, k, v), logical = _inputs(backend, "bfloat16", seed=9)
    o64, _, _, bound = _ref(logical, "bfloat16")
    fault = Fault("probs", (0, 5, 7, 8), value=0.75, replica=replica)
    out, rep = backend.attention(q, k, v, fault=fault)
    rep = backend.numpy_report(rep)
    assert np.argwhere(rep.checks["softmax_dmr"].flagged).tolist() == [[0, 5, 7]]
    assert _within(backend.logical(out), o64, bound) == (replica == 1)
    fixed, rep_c = backend.attention(q, k, v, fault=fault, on_fault="correct")
    assert int(backend.numpy_report(rep_c).corrected) == (1 - replica)  # replica 1 wrong: keep replica 0
    assert _within(backend.logical(fixed), o64, bound)


@pytest.mark.parametrize("scheme,site,idx", [("abft_qk_row", "scores", (2, 1, 4, 6)),
                                             ("abft_qk_col", "scores", (2, 1, 4, 6)),
                                             ("abft_pv_row", "out", (0, 3, 9, 2))])
def test_schemes_without_localization_recompute(backend, scheme, site, idx):
    (q, k, v), logical = _inputs(backend, "float16", seed=10)
    o64, _, _, bound = _ref(logical, "float16")
    fault = Fault(site, idx, bit=30)
    _, rep = backend.attention(q, k, v, scheme=scheme, fault=fault)
    assert bool(backend.numpy_report(rep).detected) and not backend.numpy_report(rep).located
    fixed, _ = backend.attention(q, k, v, scheme=scheme, fault=fault, on_fault="correct")
    assert _within(backend.logical(fixed), o64, bound)


@pytest.mark.parametrize("granularity", ["vector", "global"])
def test_nan_poisons_exactly_the_affected_rows(backend, granularity):
    (q, k, v), _ = _inputs(backend, "float16", seed=11)
    clean, _ = backend.attention(q, k, v, granularity=granularity)
    out, _ = backend.attention(q, k, v, granularity=granularity, on_fault="nan",
                               fault=Fault("out", (1, 4, 12, 5), bit=29))
    out, clean = backend.logical(out), backend.logical(clean)
    bad = np.isnan(out).all(-1)  # B N T
    want = np.zeros_like(bad)
    if granularity == "vector":
        want[1, 4, 12] = True
    else:
        want[1, 4, :] = True
    np.testing.assert_array_equal(bad, want)
    np.testing.assert_array_equal(out[~want], clean[~want])
    clean2, _ = backend.attention(q, k, v, granularity=granularity, on_fault="nan")
    assert not np.isnan(backend.logical(clean2)).any()


def test_raise(backend):
    (q, k, v), _ = _inputs(backend, "float16", seed=12)
    backend.attention(q, k, v, on_fault="raise")  # clean: no exception
    with pytest.raises(FaultDetected) as e:
        backend.attention(q, k, v, on_fault="raise", fault=Fault("scores", (0, 0, 1, 2), bit=30))
    assert bool(backend.numpy_report(e.value.report).checks["qk_row"].flagged[0, 0, 1])


@pytest.mark.parametrize("bad,match", [
    (Fault("scores", (B, 0, 0, 0), bit=1), "fault.index"),
    (Fault("out", (0, 0, 0, H), bit=1), "fault.index"),
    (Fault("key", (0, K, 0, 0), bit=1), "fault.index"),  # one past the last kv head
    (Fault("scores", (0, 0, 0, 0), bit=32), "fault.bit"),
    (Fault("query", (0, 0, 0, 0), bit=16), "fault.bit"),  # float16 input
])
def test_bad_faults_name_the_field(backend, bad, match):
    (q, k, v), _ = _inputs(backend, "float16")
    with pytest.raises(ValueError, match=match):
        backend.attention(q, k, v, fault=bad)


def test_bad_fault_fields_and_policies(backend):
    (q, k, v), _ = _inputs(backend, "float16")
    with pytest.raises(ValueError, match="fault.site"):
        Fault("softmax", (0, 0, 0, 0), bit=1)
    with pytest.raises(ValueError, match="fault.bit, fault.value"):
        Fault("scores", (0, 0, 0, 0))
    with pytest.raises(ValueError, match="fault.bit, fault.value"):
        Fault("scores", (0, 0, 0, 0), bit=1, value=2.0)
    with pytest.raises(ValueError, match="fault.index"):
        Fault("scores", (0, 0, 0), bit=1)
    with pytest.raises(ValueError, match="fault.replica"):
        Fault("out", (0, 0, 0, 0), bit=1, replica=1)
    with pytest.raises(ValueError, match="fault.replica"):
        backend.attention(q, k, v, scheme="abft_pv_row", fault=Fault("probs", (0, 0, 0, 0), bit=1, replica=1))
    with pytest.raises(TypeError, match="fault"):
        backend.attention(q, k, v, fault=("scores", (0, 0, 0, 0), 1))
    with pytest.raises(ValueError, match="on_fault"):
        backend.attention(q, k, v, on_fault="ignore")
    with pytest.raises(TypeError, match="on_fault"):
        backend.attention(q, k, v, on_fault=None)


def test_float32_bit_numbering_model():
    assert flip_bit(1.0, "float32", 31) == -1.0  # sign
    assert flip_bit(1.0, "float32", 23) == 0.5  # lowest exponent bit
    assert flip_bit(1.0, "float32", 0) == 1.0 + 2.0**-23  # least significant mantissa bit
    assert flip_bit(1.0, "float16", 0) == 1.0 + 2.0**-10
    assert flip_bit(1.0, "bfloat16", 0) == 1.0 + 2.0**-7
    assert flip_bit(1.0, "bfloat16", 15) == -1.0


@pytest.mark.parametrize("name", ["jax", "torch"])
def test_locate_accepts_only_a_candidate_that_explains_the_residuals(name):
    """Row 2 flags; no column flags (its threshold is larger), so the candidate column
    is the most suspicious one. It is accepted only if recomputing it removes the row's
    residual: a clean element (stored == recomputed) must not be 'located'."""
    if name == "jax":
        jnp = pytest.importorskip("jax.numpy")
        from ftattn_jax.common import OPS as ops

        arr = lambda x: jnp.asarray(np.asarray(x, np.float32))  # noqa: E731
    else:
        torch = pytest.importorskip("torch")
        from ftattn_torch.common import ops as ops_on

        ops = ops_on(torch.device("cpu"))
        arr = lambda x: torch.tensor(np.asarray(x, np.float32))  # noqa: E731
    row = (arr([[[0.0, 0.2, 5.0, -0.3]]]), arr(np.ones((1, 1, 4))))
    col = (arr([[[0.0, 0.1, 0.0, 0.0, -1.0, 5.0]]]), arr(np.full((1, 1, 6), 10.0)))
    for stored, recomputed, want in ((7.0, 2.0, True), (2.0, 2.0, False), (np.nan, 2.0, False), (9.0, 2.0, False)):
        loc = localization.locate(row, col, (1e-6, 1e-6), lambda i, j: arr([[stored]]), lambda i, j: arr([[recomputed]]),
                                  ops)
        assert [int(loc.i[0, 0]), int(loc.j[0, 0])] == [2, 5]
        assert bool(loc.ok[0, 0]) == want, (stored, recomputed)
    nan_row = (arr([[[0.0, 0.0, np.nan, 0.0]]]), row[1])
    nan_col = (arr([[[0.0, 0.0, 0.0, 0.0, 0.0, np.nan]]]), col[1])
    loc = localization.locate(nan_row, nan_col, (1e-6, 1e-6), lambda i, j: arr([[np.nan]]),
                              lambda i, j: arr([[2.0]]), ops)
    assert bool(loc.ok[0, 0]) and [int(loc.i[0, 0]), int(loc.j[0, 0])] == [2, 5]
