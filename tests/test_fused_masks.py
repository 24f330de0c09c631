"""Every mask form inside the fused kernels (Triton for PyTorch, the portable Pallas kernel for
JAX): outputs against the float64 reference, clean runs not flagged, and the same verdicts
as the unfused path on the same fault plans, in attended and in masked entries.

Without a GPU the kernels are interpreted (``TRITON_INTERPRET=1``, Pallas' interpret
mode); with ``FTATTN_TEST_TORCH_DEVICE=cuda`` and a JAX GPU backend they run compiled.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from ftattn_spec import Fault, masking
from ftattn_spec import reference as ref

from .conftest import HAVE_JAX, HAVE_TORCH, SHAPE
from .inputs import make_qkv
from .test_masks import _forms, _ref_kw

B, N, K, T, S, H = (SHAPE[a] for a in "BNKTSH")
TORCH_DEVICE = os.environ.get("FTATTN_TEST_TORCH_DEVICE", "cpu")
FORMS = list(_forms(np.random.default_rng(0)))
#: the forms run by default (the others under ``-m slow``): fewer for the fault campaigns
_QUICK = ("bias+mask+causal", "lengths", "mask-shared", "window", "bias")
BOUND_FORMS = [f if f in _QUICK[2:] else pytest.param(f, marks=pytest.mark.slow) for f in FORMS]
PLAN_FORMS = [f if f in _QUICK[:2] else pytest.param(f, marks=pytest.mark.slow) for f in FORMS]


def _plan_cases():
    """(backend, form) pairs of the fault campaigns: Triton's interpreter is the slow one, so it
    runs one form by default."""
    for backend in BACKENDS:
        for form in PLAN_FORMS:
            name = form if isinstance(form, str) else form.values[0]
            slow = not isinstance(form, str) or (backend.values[0] == "torch" and name != _QUICK[0])
            yield pytest.param(backend.values[0], name, marks=[*backend.marks, *([pytest.mark.slow] if slow else [])])


def _torch_ready():
    if not HAVE_TORCH:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return TORCH_DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


BACKENDS = [pytest.param("torch", marks=pytest.mark.skipif(not _torch_ready(), reason="needs triton")),
            pytest.param("jax", marks=pytest.mark.skipif(not HAVE_JAX, reason="needs jax"))]
FUSED = {"torch": "triton", "jax": "pallas"}


def run(backend, q, k, v, kw, **extra):
    """One call in ``backend`` on logical (BNTH) NumPy inputs; output as float64 BNTH."""
    if backend == "torch":
        import torch

        import ftattn_torch

        t = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(TORCH_DEVICE)  # noqa: E731
        args = {a: (t(b) if isinstance(b, np.ndarray) else b) for a, b in kw.items()}
        out, rep = ftattn_torch.attention(t(q), t(k), t(v), **args, **extra)
        return out.double().cpu().numpy(), rep
    import jax.numpy as jnp

    import ftattn_jax

    t = lambda x: jnp.asarray(x.transpose(0, 2, 1, 3))  # noqa: E731  logical → BTNH / BSKH
    args = {a: (jnp.asarray(b) if isinstance(b, np.ndarray) else b) for a, b in kw.items()}
    out, rep = ftattn_jax.attention(t(q), t(k), t(v), **args, **extra)
    return np.asarray(out.astype(jnp.float32), np.float64).transpose(0, 2, 1, 3), rep


def _flags(rep):
    return {n: np.asarray(c.flagged.cpu() if hasattr(c.flagged, "cpu") else c.flagged) for n, c in rep.checks.items()}


def _kw(form):
    return _forms(np.random.default_rng(0))[form]


def _allowed(kw):
    return masking.allowed(B, N, T, S, mask=kw.get("mask"), is_causal=kw.get("is_causal", False),
                           window=kw.get("local_window_size"), query_lengths=kw.get("query_seq_lengths"),
                           key_lengths=kw.get("key_value_seq_lengths"))


@pytest.mark.parametrize("form", BOUND_FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_form_runs_in_the_kernel_within_bound(backend, form):
    kw = _kw(form)
    q, k, v = make_qkv(11, "normal", dtype="float16")
    causal = kw.get("is_causal", False)
    o64, p, _ = ref.attention(q, k, v, is_causal=causal, layout="torch", **_ref_kw(kw))
    bound = ref.output_bound(q, k, v, p, o64, dtype="float16", is_causal=causal, layout="torch", **_ref_kw(kw))
    out, rep = run(backend, q, k, v, kw, implementation=FUSED[backend])
    assert rep.ran.implementation == FUSED[backend]
    assert np.all(np.isfinite(out))
    worst = float(np.max(np.abs(out - o64) / bound))
    assert worst <= 1.0, f"output error {worst:.3g} x the bound"
    assert not bool(rep.detected), {n: float(np.nanmax(np.asarray(c.residual.cpu() if hasattr(c.residual, "cpu")
                                                                       else c.residual)))
                                    for n, c in rep.checks.items()}


def _plans(kw, seed):
    """Faults in attended and in masked scores and probabilities (both replicas), and in the output."""
    a = _allowed(kw)
    rng = np.random.default_rng(seed)
    att, msk = np.argwhere(a), np.argwhere(~a)
    pick = lambda xs: tuple(int(x) for x in xs[rng.integers(len(xs))])  # noqa: E731
    plans = [Fault("scores", pick(att), bit=30), Fault("probs", pick(att), bit=29, replica=1),
             Fault("out", (1, 2, int(rng.integers(T)), 3), bit=30), Fault("out", (2, 5, T - 1, 3), value=-100.0)]
    if len(msk):
        plans += [Fault("scores", pick(msk), value=1e4), Fault("probs", pick(msk), bit=30)]
    return plans


@pytest.mark.parametrize("backend,form", list(_plan_cases()))
def test_fused_and_unfused_verdicts_agree_on_every_plan(backend, form):
    kw = _kw(form)
    q, k, v = make_qkv(12, "normal", dtype="float16")
    a = _allowed(kw)
    for fault in _plans(kw, abs(hash(form)) % 1000):
        _, rf = run(backend, q, k, v, kw, implementation=FUSED[backend], fault=fault)
        _, ru = run(backend, q, k, v, kw, implementation="unfused", fault=fault)
        assert bool(rf.detected) == bool(ru.detected), fault
        # the same rows are flagged (which checks flag a row past the first one that sees the
        # fault depends on how far the corrupted value travels: not compared)
        ff, fu = _flags(rf), _flags(ru)
        rows_f = np.any([ff[n] for n in ff], axis=0)
        rows_u = np.any([fu[n] for n in ff], axis=0)
        np.testing.assert_array_equal(rows_f, rows_u, err_msg=str(fault))
        if fault.site == "scores":  # a masked score is left out of every checksum, an attended one is seen
            assert bool(rf.detected) == bool(a[fault.index]), fault


@pytest.mark.parametrize("backend", BACKENDS)
def test_correct_recomputes_under_a_mask(backend):
    kw = _kw("bias+mask+causal")
    q, k, v = make_qkv(13, "normal", dtype="float16")
    clean, _ = run(backend, q, k, v, kw, implementation=FUSED[backend])
    att = np.argwhere(_allowed(kw))
    fault = Fault("out", tuple(int(x) for x in att[len(att) // 2][:3]) + (1,), bit=30)
    out, rep = run(backend, q, k, v, kw, implementation=FUSED[backend], fault=fault, on_fault="correct")
    assert bool(rep.detected) and int(rep.corrected) >= 1
    np.testing.assert_array_equal(out, clean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_under_masks_are_those_of_plain_attention(backend):
    kw = dict(mask=_kw("mask-shared")["mask"], bias=_kw("bias")["bias"], local_window_size=(9, 4),
              key_value_seq_lengths=np.array([S, 30, 9], np.int32))
    q, k, v = make_qkv(14, "normal", dtype="float16")
    w = np.random.default_rng(3).standard_normal((B, N, T, H))
    grads = []
    for impl in (FUSED[backend], "unfused"):
        if backend == "torch":
            import torch

            import ftattn_torch

            t = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(TORCH_DEVICE)  # noqa: E731
            xs = [t(x).requires_grad_(True) for x in (q, k, v)]
            bias = t(kw["bias"]).requires_grad_(True)
            args = {a: t(b) for a, b in kw.items() if isinstance(b, np.ndarray) and a != "bias"}
            out, _ = ftattn_torch.attention(*xs, bias=bias, local_window_size=kw["local_window_size"],
                                            implementation=impl, **args)
            (out.float() * t(w).float()).sum().backward()
            grads.append([x.grad.double().cpu().numpy() for x in (*xs, bias)])
        else:
            import jax
            import jax.numpy as jnp

            import ftattn_jax

            tr = lambda x: jnp.asarray(x.transpose(0, 2, 1, 3))  # noqa: E731
            args = {a: jnp.asarray(b) for a, b in kw.items() if isinstance(b, np.ndarray) and a != "bias"}

            def loss(q_, k_, v_, b_):
                out, _ = ftattn_jax.attention(q_, k_, v_, bias=b_, local_window_size=kw["local_window_size"],
                                              implementation=impl, **args)
                return jnp.sum(out.astype(jnp.float32) * tr(w).astype(jnp.float32))

            g = jax.grad(loss, argnums=(0, 1, 2, 3))(tr(q), tr(k), tr(v), jnp.asarray(kw["bias"]))
            grads.append([np.asarray(x, np.float64).transpose(0, 2, 1, 3) if x.ndim == 4 and i < 3
                          else np.asarray(x, np.float64) for i, x in enumerate(g)])
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, atol=5e-3, rtol=2e-2)


@pytest.mark.skipif(not HAVE_JAX, reason="needs jax")
def test_jax_dropin_spreads_fully_masked_rows_in_the_kernel_as_jax_nn_does():
    import jax
    import jax.numpy as jnp

    import ftattn_jax

    q, k, v = (jnp.asarray(x.transpose(0, 2, 1, 3)) for x in make_qkv(15, "normal", dtype="float16"))
    mask = np.ones((B, 1, T, S), bool)
    mask[1, 0, 6] = False  # a fully masked row
    lengths = jnp.asarray([T, 20, 9], jnp.int32)
    want = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask), query_seq_lengths=lengths)
    out, rep = ftattn_jax.dot_product_attention(q, k, v, mask=jnp.asarray(mask), query_seq_lengths=lengths,
                                                implementation="pallas", return_report=True)
    assert rep.ran.implementation == "pallas" and not bool(rep.detected)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), atol=4e-3)
    assert float(jnp.max(jnp.abs(out[1, 6].astype(jnp.float32)))) > 0  # the mean of the values, not zero


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoding_one_query_against_a_long_cache(backend):
    q, k, v = make_qkv(16, "normal", dtype="float16", T=1, S=77)
    lengths = np.array([77, 50, 3], np.int32)
    kw = dict(key_value_seq_lengths=lengths)
    o64, p, _ = ref.attention(q, k, v, layout="torch", key_lengths=lengths)
    bound = ref.output_bound(q, k, v, p, o64, dtype="float16", layout="torch", key_lengths=lengths)
    out, rep = run(backend, q, k, v, kw, implementation=FUSED[backend])
    assert out.shape == (B, N, 1, H) and np.all(np.abs(out - o64) <= bound) and not bool(rep.detected)
