"""Masks, biases, windows and sequence lengths: both backends against the float64
reference, against each other, and with faults in masked and attended entries."""

from __future__ import annotations

import numpy as np
import pytest

from ftattn_spec import Fault
from ftattn_spec import reference as ref

from .conftest import HAVE_JAX, HAVE_TORCH, SHAPE
from .inputs import make_qkv

pytestmark = pytest.mark.skipif(not (HAVE_JAX and HAVE_TORCH), reason="needs jax and torch")

B, N, K, T, S, H = (SHAPE[a] for a in "BNKTSH")


def _forms(rng):
    """Each mask form of ``ftattn_spec.masking`` (logical BNTS), with some fully masked rows."""
    shared = rng.random((B, 1, T, S)) > 0.4
    shared[1, 0, 5] = False  # a fully masked row
    per_head = rng.random((N, T, S)) > 0.5
    return {
        "mask-shared": dict(mask=shared),
        "mask-per-head": dict(mask=per_head),
        "mask-2d": dict(mask=rng.random((T, S)) > 0.3),
        "bias": dict(bias=rng.standard_normal((B, N, T, S)).astype(np.float32)),
        "bias-broadcast": dict(bias=rng.standard_normal((1, 1, T, S)).astype(np.float32)),
        "bias+mask+causal": dict(bias=rng.standard_normal((1, N, T, S)).astype(np.float32), mask=shared,
                                 is_causal=True),
        "window": dict(local_window_size=(3, 2)),
        "window-int+causal": dict(local_window_size=4, is_causal=True),
        "lengths": dict(query_seq_lengths=np.array([T, 20, 1], np.int32),
                        key_value_seq_lengths=np.array([S, 7, 30], np.int32)),
        "lengths+causal": dict(key_value_seq_lengths=np.array([S, 3, 30], np.int32), is_causal=True),
    }


def _ref_kw(kw):
    return dict(mask=kw.get("mask"), bias=kw.get("bias"), window=kw.get("local_window_size"),
                query_lengths=kw.get("query_seq_lengths"), key_lengths=kw.get("key_value_seq_lengths"))


def run_jax(q, k, v, kw, **extra):
    import jax.numpy as jnp

    import ftattn_jax

    t = lambda x: jnp.asarray(x.transpose(0, 2, 1, 3))  # noqa: E731  logical → BTNH / BSKH
    kw = {a: (jnp.asarray(b) if isinstance(b, np.ndarray) else b) for a, b in kw.items()}
    out, rep = ftattn_jax.attention(t(q), t(k), t(v), **kw, **extra)
    return np.asarray(out.astype(jnp.float32), np.float64).transpose(0, 2, 1, 3), rep


def run_torch(q, k, v, kw, **extra):
    import torch

    import ftattn_torch

    kw = {a: (torch.from_numpy(b) if isinstance(b, np.ndarray) else b) for a, b in kw.items()}
    out, rep = ftattn_torch.attention(*(_tensor(x) for x in (q, k, v)), **kw, **extra)
    return out.double().numpy(), rep


def _tensor(x):
    import torch

    if x.dtype.name == "bfloat16":  # NumPy's bfloat16 (ml_dtypes) has no torch counterpart: exact via float32
        return torch.from_numpy(np.ascontiguousarray(x.astype(np.float32))).bfloat16()
    return torch.from_numpy(np.ascontiguousarray(x))


def _inputs(seed, dtype="float32"):
    return make_qkv(seed, "normal", dtype=dtype)


@pytest.mark.parametrize("form", list(_forms(np.random.default_rng(0))))
@pytest.mark.parametrize("scheme", ["full", "baseline"])
def test_mask_forms_match_reference_and_agree(form, scheme):
    rng = np.random.default_rng(abs(hash(form)) % 2**31)
    kw = _forms(rng)[form]
    q, k, v = _inputs(abs(hash(form)) % 1000)
    o64, p, _ = ref.attention(q, k, v, is_causal=kw.get("is_causal", False), layout="torch", **_ref_kw(kw))
    bound = ref.output_bound(q, k, v, p, o64, dtype="float32", is_causal=kw.get("is_causal", False),
                             layout="torch", **_ref_kw(kw))
    oj, rj = run_jax(q, k, v, kw, scheme=scheme)
    ot, rt = run_torch(q, k, v, kw, scheme=scheme)
    assert np.all(np.abs(oj - o64) <= bound), form
    assert np.all(np.abs(ot - o64) <= bound), form
    assert not bool(rj.detected) and not bool(rt.detected)
    for name in rj.checks:
        np.testing.assert_allclose(np.asarray(rj.checks[name].threshold), rt.checks[name].threshold.numpy(),
                                   rtol=1e-3, err_msg=name)


def test_fully_masked_rows_are_zero():
    q, k, v = _inputs(3)
    mask = np.ones((B, 1, T, S), bool)
    mask[0, 0, 4] = False
    for run in (run_jax, run_torch):
        out, rep = run(q, k, v, dict(mask=mask))
        assert np.all(out[0, :, 4] == 0.0) and np.all(np.isfinite(out))
        assert not bool(rep.detected)


def test_minus_inf_bias_removes_keys():
    q, k, v = _inputs(4)
    bias = np.zeros((1, 1, T, S), np.float32)
    bias[..., 10:] = -np.inf
    bias[..., 6, :] = -np.inf  # a row with every logit -inf: zeros, not NaN
    o64, _, _ = ref.attention(q, k, v, layout="torch", bias=bias)
    for run in (run_jax, run_torch):
        out, rep = run(q, k, v, dict(bias=bias))
        np.testing.assert_allclose(out, o64, atol=1e-5)
        assert np.all(out[:, :, 6] == 0.0) and not bool(rep.detected)


@pytest.mark.parametrize("run", [run_jax, run_torch], ids=["jax", "torch"])
def test_fault_in_masked_entry_is_not_seen_and_in_attended_entry_is_located(run):
    q, k, v = _inputs(5)
    mask = np.ones((B, 1, T, S), bool)
    mask[2, 0, 9, 11] = False
    masked = Fault("scores", (2, 4, 9, 11), value=1e4)
    out_clean, _ = run(q, k, v, dict(mask=mask))
    out, rep = run(q, k, v, dict(mask=mask), fault=masked)
    assert not bool(rep.detected)  # excluded from the checksums, and harmless
    np.testing.assert_array_equal(out, out_clean)
    attended = Fault("scores", (2, 4, 9, 12), value=1e4)
    out, rep = run(q, k, v, dict(mask=mask), fault=attended)
    assert bool(rep.detected)
    assert tuple(np.asarray(rep.located["scores"])[2, 4]) == (9, 12)
    out, rep = run(q, k, v, dict(mask=mask), fault=attended, on_fault="correct")
    assert int(rep.corrected) >= 1
    assert np.max(np.abs(out - out_clean)) <= 1e-5


@pytest.mark.parametrize("run", [run_jax, run_torch], ids=["jax", "torch"])
def test_fault_detected_under_window_and_lengths(run):
    q, k, v = _inputs(6)
    kw = dict(local_window_size=(5, 0), key_value_seq_lengths=np.array([S, 30, 20], np.int32))
    _, rep = run(q, k, v, kw)
    assert not bool(rep.detected)
    _, rep = run(q, k, v, kw, fault=Fault("scores", (1, 2, 12, 9), bit=30))
    assert bool(rep.detected)
    assert bool(np.asarray(rep.checks["qk_row"].flagged)[1, 2, 12])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_masks_within_bound(dtype):
    rng = np.random.default_rng(7)
    kw = dict(mask=rng.random((B, N, T, S)) > 0.3, bias=rng.standard_normal((B, 1, T, S)).astype(np.float32),
              is_causal=True)
    q, k, v = _inputs(7, dtype)
    o64, p, _ = ref.attention(q, k, v, is_causal=True, layout="torch", **_ref_kw(kw))
    bound = ref.output_bound(q, k, v, p, o64, dtype=dtype, is_causal=True, layout="torch", **_ref_kw(kw))
    for run in (run_jax, run_torch):
        out, rep = run(q, k, v, kw)
        assert np.all(np.abs(out - o64) <= bound)
        assert not bool(rep.detected)
