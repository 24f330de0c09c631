"""The exponential checksum ``softmax_exp`` (scheme ``abft_softmax``) on the unfused paths of both
backends: clean runs never flagged (every input distribution, dtype and mask form, logits scaled
up a thousandfold, ``empty="uniform"``), a corrupted probability flagged at its row, repaired by
``on_fault="correct"``, poisoned by ``"nan"``, and the two backends' residuals in agreement."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from ftattn_spec import Fault
from ftattn_spec import reference as ref
from ftattn_spec.inputs import DISTRIBUTIONS

from .conftest import HAVE_JAX, HAVE_TORCH, assert_distinct_axes
from .inputs import make_qkv

pytestmark = pytest.mark.skipif(not (HAVE_JAX and HAVE_TORCH), reason="needs jax and torch")

# three tiles of keys (ec.TILE = 64), the last one partial; every axis a different size
SHAPE = dict(B=3, N=4, K=2, T=29, S=150, H=16)
assert_distinct_axes(SHAPE, "test_softmax_exp_unfused.SHAPE")
B, N, K, T, S, H = (SHAPE[a] for a in "BNKTSH")
SCALE = H**-0.5
NEG32 = float(np.finfo(np.float32).min)


def _masks():
    """A boolean mask with fully masked rows, a bias with −inf entries (and a row of them), and
    the finfo.min padding bias of Hugging Face models (logical BNTS)."""
    rng = np.random.default_rng(0)
    mask = rng.random((B, 1, T, S)) > 0.4
    mask[1, 0, 5] = False  # a fully masked row
    bias = rng.standard_normal((1, N, T, S)).astype(np.float32)
    bias[..., 100:] = -np.inf
    bias[0, 1, 7] = -np.inf  # every logit −inf: zeros
    hf = np.zeros((B, 1, 1, S), np.float32)
    hf[1, ..., 40:] = NEG32
    return mask, bias, hf


MASK, BIAS, HF_BIAS = _masks()
FORMS = {
    "none": {},
    "causal": dict(is_causal=True),
    "mask+bias": dict(mask=MASK, bias=BIAS),
    "lengths+window": dict(query_seq_lengths=np.array([T, 20, 1], np.int32),
                           key_value_seq_lengths=np.array([S, 7, 70], np.int32), local_window_size=(40, 3),
                           is_causal=True),
    "bias-min+causal": dict(bias=HF_BIAS, is_causal=True),
}


def _x64(dtype):
    import jax

    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def run_jax(q, k, v, kw=None, **extra):
    """``ftattn_jax.attention`` (unfused, ``abft_softmax`` unless given) on logical NumPy inputs:
    the output (logical, float64) and the report as NumPy."""
    import jax.numpy as jnp

    import ftattn_jax

    with _x64(q.dtype.name):
        t = lambda x: jnp.asarray(np.ascontiguousarray(x.transpose(0, 2, 1, 3)))  # noqa: E731
        args = {a: (jnp.asarray(b) if isinstance(b, np.ndarray) else b) for a, b in (kw or {}).items()}
        extra = {"scheme": "abft_softmax", "implementation": "unfused", **extra}
        out, rep = ftattn_jax.attention(t(q), t(k), t(v), **args, **extra)
        out = np.asarray(out.astype(jnp.float64 if q.dtype.name == "float64" else jnp.float32), np.float64)
        return out.transpose(0, 2, 1, 3), _numpy(rep)


def _tensor(x):
    import torch

    if x.dtype.name == "bfloat16":  # ml_dtypes' bfloat16 has no torch counterpart: exact via float32
        return torch.from_numpy(np.ascontiguousarray(x.astype(np.float32))).bfloat16()
    return torch.from_numpy(np.ascontiguousarray(x))


def run_torch(q, k, v, kw=None, **extra):
    """``ftattn_torch.attention`` (unfused, ``abft_softmax`` unless given), as :func:`run_jax`."""
    import ftattn_torch

    args = {a: (_tensor(b) if isinstance(b, np.ndarray) else b) for a, b in (kw or {}).items()}
    extra = {"scheme": "abft_softmax", "implementation": "unfused", **extra}
    out, rep = ftattn_torch.attention(*(_tensor(x) for x in (q, k, v)), **args, **extra)
    return out.double().numpy(), _numpy(rep)


def _numpy(rep):
    """``{"detected", "corrected", check: (residual, threshold, flagged)}`` as NumPy."""
    a = lambda x: np.asarray(x.cpu() if hasattr(x, "cpu") else x)  # noqa: E731
    d = {name: tuple(a(x) for x in (c.residual, c.threshold, c.flagged)) for name, c in rep.checks.items()}
    return dict(d, detected=bool(a(rep.detected)), corrected=int(a(rep.corrected)))


RUNS = [pytest.param(run_jax, id="jax"), pytest.param(run_torch, id="torch")]


def _ref(q, k, v, kw):
    f = lambda x: x.astype(np.float64)  # noqa: E731
    masks = dict(mask=kw.get("mask"), bias=kw.get("bias"), window=kw.get("local_window_size"),
                 query_lengths=kw.get("query_seq_lengths"), key_lengths=kw.get("key_value_seq_lengths"))
    o64, p, _ = ref.attention(f(q), f(k), f(v), is_causal=kw.get("is_causal", False), layout="torch", **masks)
    bound = ref.output_bound(f(q), f(k), f(v), p, o64, dtype=q.dtype.name if q.dtype.name != "float64" else "float32",
                             is_causal=kw.get("is_causal", False), layout="torch", **masks)
    return o64, np.asarray(p), bound


# ---- (a) clean runs are never flagged


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("dtype", ["float16", pytest.param("bfloat16", marks=pytest.mark.slow), "float32",
                                   pytest.param("float64", marks=pytest.mark.slow)])
def test_clean_runs_are_not_flagged(dtype, form):
    """Every distribution, as drawn and with the query (so the logits) a thousand times larger
    (a hundred for float16's outliers, which would overflow): no row flagged."""
    kw = FORMS[form]
    for dist in DISTRIBUTIONS:
        seed = 10 * list(FORMS).index(form) + DISTRIBUTIONS.index(dist)
        q, k, v = make_qkv(seed, dist, dtype="float32", shape=SHAPE)
        for factor in (1.0, 1e3):
            if dtype == "float16" and np.abs(q).max() * factor > 6e4:
                factor = 1e2
            qkv = [(q * factor).astype(dtype), k.astype(dtype), v.astype(dtype)]
            for run in (run_jax, run_torch):
                _, rep = run(*qkv, kw)
                res, thr, flagged = rep["softmax_exp"]
                assert res.shape == (B, N, T) and np.all(thr == 1.0)
                assert not rep["detected"] and not flagged.any(), (dist, factor, run.__name__, float(res.max()))


def test_uniform_empty_rows_are_not_flagged():
    """``empty="uniform"`` (``jax.nn``'s rule): a fully masked row spreads over its ``NEG`` logits,
    rows beyond the query length stay zero; both backends pass and agree."""
    import jax.numpy as jnp
    import torch

    import ftattn_jax
    from ftattn_torch.unfused import core

    q, k, v = make_qkv(3, "normal", dtype="float32", shape=SHAPE)
    mask = MASK.copy()
    mask[2, 0, :4] = False  # more fully masked rows
    lengths = np.array([T, 11, 25], np.int32)
    for kw in (dict(mask=mask), dict(mask=mask, query_seq_lengths=lengths, is_causal=True),
               dict(bias=np.full((1, 1, T, S), NEG32, np.float32))):  # every row "masked" by the bias
        t = lambda x: jnp.asarray(np.ascontiguousarray(x.transpose(0, 2, 1, 3)))  # noqa: E731
        args = {a: (jnp.asarray(b) if isinstance(b, np.ndarray) else b) for a, b in kw.items()}
        out_j, rep_j = ftattn_jax.dot_product_attention(t(q), t(k), t(v), **args, scheme="abft_softmax",
                                                        implementation="unfused", return_report=True)
        _, rep_t = core.run(*(torch.from_numpy(x) for x in (q, k, v)), checks=("softmax_exp",), granularity="vector",
                            scale=SCALE, is_causal=kw.get("is_causal", False), empty="uniform",
                            mask=None if "mask" not in kw else torch.from_numpy(kw["mask"]),
                            bias=None if "bias" not in kw else torch.from_numpy(kw["bias"]),
                            query_lengths=None if "query_seq_lengths" not in kw else torch.from_numpy(lengths))
        rj, rt = _numpy(rep_j)["softmax_exp"], _numpy(rep_t)["softmax_exp"]
        assert not rj[2].any() and not rt[2].any()
        np.testing.assert_allclose(rj[0], rt[0], atol=0.05)
        if "mask" in kw:  # the uniform rows: the mean of the values (not zero)
            assert np.all(np.isfinite(np.asarray(out_j))) and float(jnp.abs(out_j[1, 5]).max()) > 0


# ---- (b, c) a corrupted probability is flagged at its row


def _largest(p, b, n, i):
    return b, n, i, int(np.argmax(p[b, n, i]))


@pytest.mark.parametrize("granularity", ["vector", "global"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("run", RUNS)
def test_flipped_bits_of_a_large_probability_are_flagged_at_their_row(run, dtype, granularity):
    q, k, v = make_qkv(11, "normal", dtype=dtype, shape=SHAPE)
    _, p, _ = _ref(q, k, v, {})
    idx = _largest(p, 2, 3, 17)
    for bit in (*range(23, 31), 22, 21):
        _, rep = run(q, k, v, fault=Fault("probs", idx, bit=bit), granularity=granularity)
        res, _, flagged = rep["softmax_exp"]
        want = np.zeros((B, N, T) if granularity == "vector" else (B, N), bool)
        want[idx[:3] if granularity == "vector" else idx[:2]] = True
        np.testing.assert_array_equal(flagged, want, err_msg=f"bit {bit}")
        assert rep["detected"]
    # bit 0 of a tiny probability is below the checksum's rounding: it may pass, and it flags no other row
    tiny = (1, 2, 9, int(np.argmin(p[1, 2, 9])))
    _, rep = run(q, k, v, fault=Fault("probs", tiny, bit=0), granularity=granularity)
    others = rep["softmax_exp"][2].copy()
    others[tiny[:3] if granularity == "vector" else tiny[:2]] = False
    assert not others.any()


@pytest.mark.parametrize("run", RUNS)
def test_faults_where_the_softmax_gives_zero_or_a_non_finite_value_are_flagged(run):
    """A probability must be exactly 0 where the softmax makes it 0 (masked, −inf logit, a fully
    masked row): a nonzero one there fails closed, as do NaN and infinity anywhere."""
    q, k, v = make_qkv(12, "normal", dtype="float16", shape=SHAPE)
    kw = dict(mask=MASK, bias=BIAS)
    j_masked = int(np.argmin(MASK[0, 0, 20]))
    j_inf = 100 + int(np.argmax(MASK[2, 0, 28, 100:]))
    assert not MASK[0, 0, 20, j_masked] and MASK[2, 0, 28, j_inf] and np.isneginf(BIAS[0, 3, 28, j_inf])
    assert np.all(np.isneginf(BIAS[0, 1, 7])) and not MASK[1, 0, 5].any()
    cases = [(FORMS["causal"], Fault("probs", (0, 1, 3, 10), bit=30)),  # above the causal diagonal
             (kw, Fault("probs", (0, 2, 20, j_masked), bit=29)),  # masked by the boolean mask
             (kw, Fault("probs", (1, 1, 5, 2), value=0.25)),  # a fully masked row (output zero)
             (kw, Fault("probs", (2, 3, 28, j_inf), bit=30)),  # a −inf bias entry
             (kw, Fault("probs", (0, 1, 7, 3), value=0.5)),  # a row whose every logit is −inf
             (kw, Fault("probs", (2, 0, 28, 4), value=float("nan"))),
             ({}, Fault("probs", (2, 0, 27, 5), value=float("inf")))]
    for form in (FORMS["causal"], kw):
        assert not run(q, k, v, form)[1]["detected"]
    for form, fault in cases:
        _, rep = run(q, k, v, form, fault=fault)
        want = np.zeros((B, N, T), bool)
        want[fault.index[:3]] = True
        np.testing.assert_array_equal(rep["softmax_exp"][2], want, err_msg=str(fault))


# ---- (d) on_fault="correct" and "nan"


@pytest.mark.parametrize("form", ["none", "bias-min+causal"])
@pytest.mark.parametrize("run", RUNS)
def test_correct_recomputes_the_flagged_rows(run, form):
    kw = FORMS[form]
    q, k, v = make_qkv(13, "normal", dtype="bfloat16", shape=SHAPE)
    o64, p, bound = _ref(q, k, v, kw)
    clean, rep = run(q, k, v, kw)
    assert not rep["detected"]
    faults = [Fault("probs", _largest(p, 0, 3, 21), bit=29), Fault("probs", _largest(p, 2, 1, 4), bit=22)]
    bad, rep = run(q, k, v, kw, fault=faults)
    assert rep["detected"] and not np.all(np.abs(bad - o64) <= bound)
    out, rep = run(q, k, v, kw, fault=faults, on_fault="correct")
    assert rep["detected"] and rep["corrected"] == 2
    assert np.all(np.abs(out - o64) <= bound)
    assert np.max(np.abs(out - o64)) <= np.max(np.abs(clean - o64))  # the clean output's error, no more
    out, rep = run(q, k, v, kw, fault=faults, on_fault="nan")
    poisoned = np.isnan(out).any(-1)
    want = np.zeros((B, N, T), bool)
    for f in faults:
        want[f.index[:3]] = True
    np.testing.assert_array_equal(poisoned, want)
    assert np.all(np.isnan(out[want]))


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_scheme_with_both_softmax_checks(backend):
    """``softmax_dmr`` and ``softmax_exp`` together (no public scheme has both): a fault in the
    output's softmax is flagged by both and repaired once; one in the DMR's replica by the DMR
    alone, and the vote keeps the probabilities."""
    q, k, v = make_qkv(14, "normal", dtype="float16", shape=SHAPE)
    o64, p, bound = _ref(q, k, v, {})
    checks = ("qk_row", "softmax_dmr", "softmax_exp", "pv_row")
    if backend == "jax":
        import jax.numpy as jnp

        from ftattn_jax.unfused import core

        args = [jnp.asarray(np.ascontiguousarray(x.transpose(0, 2, 1, 3))) for x in (q, k, v)]
        logical = lambda o: np.asarray(o.astype(jnp.float32), np.float64).transpose(0, 2, 1, 3)  # noqa: E731
    else:
        from ftattn_torch.unfused import core

        args = [_tensor(x) for x in (q, k, v)]
        logical = lambda o: o.double().numpy()  # noqa: E731
    from ftattn_spec.faults import plan

    def run(fault, on_fault):
        out, rep = core.run(*args, checks=checks, granularity="vector", scale=SCALE, is_causal=False,
                            on_fault=on_fault, plan=None if fault is None else plan([fault]))
        return logical(out), _numpy(rep)

    clean, rep = run(None, "correct")
    assert not rep["detected"] and rep["corrected"] == 0
    idx = _largest(p, 1, 2, 6)
    out, rep = run(Fault("probs", idx, bit=28), "correct")
    assert rep["softmax_exp"][2][idx[:3]] and rep["softmax_dmr"][2][idx[:3]]
    assert rep["corrected"] == 1 and np.all(np.abs(out - o64) <= bound)
    np.testing.assert_array_equal(out, clean)
    out, rep = run(Fault("probs", idx, bit=28, replica=1), "correct")
    assert rep["softmax_dmr"][2][idx[:3]] and not rep["softmax_exp"][2].any()
    assert rep["corrected"] == 0
    np.testing.assert_array_equal(out, clean)
    out, rep = run(Fault("probs", idx, bit=28), "nan")
    assert np.isnan(out[idx[:3]]).all() and np.isnan(out).any(-1).sum() == 1


# ---- (e) the two backends agree


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_backends_residuals_agree(dtype):
    q, k, v = make_qkv(15, "outliers", dtype=dtype, shape=SHAPE)
    _, p, _ = _ref(q, k, v, FORMS["causal"])
    faults = [Fault("probs", _largest(p, 0, 0, 28), value=float(p[_largest(p, 0, 0, 28)]) * 1.25),
              Fault("probs", _largest(p, 1, 3, 12), bit=22),
              Fault("probs", _largest(p, 2, 1, 25), bit=24)]
    for fault in (None, faults):
        _, rj = run_jax(q, k, v, FORMS["causal"], fault=fault)
        _, rt = run_torch(q, k, v, FORMS["causal"], fault=fault)
        np.testing.assert_array_equal(rj["softmax_exp"][1], rt["softmax_exp"][1])
        np.testing.assert_array_equal(rj["softmax_exp"][2], rt["softmax_exp"][2])
        # rounding noise (a few percent of the bound) apart, faulted rows a relative 1e-3
        np.testing.assert_allclose(rj["softmax_exp"][0], rt["softmax_exp"][0], rtol=1e-3, atol=0.05)
        if fault is not None:
            assert rj["softmax_exp"][2].sum() == 3


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_small_error_in_a_large_probability_is_flagged_by_the_row_sum(backend):
    """P as the P·V product reads it must sum to 1 within its conversion's rounding
    (``exp_checksum.sum_coefficients``): a relative error of 1.5e-3 in a probability near 1 is
    below the tiles' floor (2.2e-3 at S = 256) but moves the row sum by more than float16's
    rounding (4.9e-4); an error of 1e-5 moves it by less and passes."""
    from ftattn_spec import exp_checksum as ec
    from ftattn_spec.faults import Fault

    rng = np.random.default_rng(3)
    B_, N_, T_, S_, H_ = 1, 2, 5, 256, 16
    q = rng.standard_normal((B_, N_, T_, H_)) * 3.0
    k = rng.standard_normal((B_, N_, S_, H_))
    k[0, 1, 7] = q[0, 1, 2] * 3.0  # a key that takes most of row 2's probability
    v = rng.standard_normal((B_, N_, S_, H_))
    res = {}
    for delta in (1.5e-3, 1e-5):
        f = Fault("probs", (0, 1, 2, 7), value=1.0 + delta)
        if backend == "jax":
            import jax.numpy as jnp

            import ftattn_jax
            args = [jnp.asarray(np.swapaxes(x, 1, 2), jnp.float16) for x in (q, k, v)]
            _, rep = ftattn_jax.attention(*args, scheme="abft_softmax", fault=f)
        else:
            import torch

            import ftattn_torch
            args = [torch.tensor(x, dtype=torch.float16) for x in (q, k, v)]
            _, rep = ftattn_torch.attention(*args, scheme="abft_softmax", fault=f)
        c = rep.checks["softmax_exp"]
        res[delta] = (bool(np.asarray(c.flagged)[0, 1, 2]), int(np.asarray(c.flagged).sum()))
    assert res[1.5e-3] == (True, 1) and res[1e-5] == (False, 0), res
    assert 1e-5 < ec.sum_coefficients(S_, "float16").rel < 1.5e-3 * 0.9
