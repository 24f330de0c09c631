"""The fused backward of ``implementation="pallas"`` (``ftattn_jax/fused/pallas_backward.py``).

The contract of ``tests/test_fused_backward.py`` (PyTorch), in JAX: each gradient's error
against float64 stays within a small multiple of a low-precision reference's, for the mask
forms, GQA and T ≠ S; clean backwards are never flagged; a fault at each backward site is
detected and counted under the call site plus " (backward)"; the policies act on the
gradients; the whole thing works under ``jax.jit`` and ``jax.grad``. Interpreted on the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import ftattn_jax  # noqa: E402
from ftattn_jax import counters  # noqa: E402

from .fused_cases import SHAPE  # noqa: E402

RATIO = 3.0
SLOW = pytest.mark.slow
#: a smaller shape for the tests that run the backward several times (GQA, T ≠ S, partial tiles)
SMALL = dict(SHAPE, T=21, S=26)

FORMS = {
    "causal": {"is_causal": True},
    "window-lengths": {"local_window_size": (5, 3), "query_seq_lengths": [30, 37, 12],
                       "key_value_seq_lengths": [45, 20, 33]},
    "mask-bias": {"mask": "dense", "bias": "dense"},
    "causal-T>S": {"is_causal": True, "T": 45, "S": 29},
}


def _call(form: str, seed: int):
    kw = dict(FORMS[form])
    shape = dict(SHAPE)
    shape.update({a: kw.pop(a) for a in ("T", "S") if a in kw})
    B, N, K, T, S, H = (shape[a] for a in "BNKTSH")
    assert len({B, N, K, T, S, H}) == 6  # a swapped axis fails
    rng = np.random.default_rng(seed)
    leaves = {"q": rng.standard_normal((B, T, N, H)), "k": rng.standard_normal((B, S, K, H)),
              "v": rng.standard_normal((B, S, K, H))}
    grad_out = rng.standard_normal((B, T, N, H))
    if kw.get("mask") == "dense":
        kw["mask"] = jnp.asarray(rng.random((B, 1, T, S)) > 0.3)
    if kw.get("bias") == "dense":
        leaves["bias"] = rng.standard_normal((1, N, T, S))
        kw.pop("bias")
    for name in ("query_seq_lengths", "key_value_seq_lengths"):
        if name in kw:
            kw[name] = jnp.asarray(kw[name], jnp.int32)
    return leaves, grad_out, kw


def _grads(leaves, grad_out, kw, dtype, implementation):
    names = list(leaves)

    def f(*xs):
        d = dict(zip(names, xs))
        return ftattn_jax.attention(d["q"], d["k"], d["v"], bias=d.get("bias"), implementation=implementation,
                                    **kw)[0]

    xs = [jnp.asarray(leaves[n], dtype) for n in names]
    out, vjp = jax.vjp(f, *xs)
    return dict(zip(names, vjp(jnp.asarray(grad_out, out.dtype))))


def _keep(kw, B, T, S):
    i, j = np.arange(T)[:, None], np.arange(S)[None, :]
    keep = np.ones((B, 1, T, S), bool)
    if kw.get("is_causal"):
        keep = keep & (j <= i)
    if "local_window_size" in kw:
        left, right = kw["local_window_size"]
        keep = keep & (j >= i - left) & (j <= i + right)
    if "query_seq_lengths" in kw:
        keep = keep & (i[None, None] < np.asarray(kw["query_seq_lengths"])[:, None, None, None])
    if "key_value_seq_lengths" in kw:
        keep = keep & (j[None, None] < np.asarray(kw["key_value_seq_lengths"])[:, None, None, None])
    if "mask" in kw:
        keep = keep & np.asarray(kw["mask"])
    return jnp.asarray(keep)


def _low_precision(leaves, grad_out, kw, dtype):
    """Plain attention with every product and P in ``dtype`` (float32 softmax), from the same
    rounded inputs: the low-precision reference."""
    names = list(leaves)
    B, T, N, H = leaves["q"].shape
    S, K = leaves["k"].shape[1:3]
    keep = _keep(kw, B, T, S)

    def f(*xs):
        d = dict(zip(names, xs))
        kk, vv = jnp.repeat(d["k"], N // K, 2), jnp.repeat(d["v"], N // K, 2)
        s = jnp.einsum("btnh,bsnh->bnts", d["q"], kk) * H ** -0.5
        if "bias" in d:
            s = s + d["bias"]
        s = jnp.where(keep, s.astype(jnp.float32), -jnp.inf)
        p = jnp.nan_to_num(jax.nn.softmax(s, -1), nan=0.0).astype(dtype)
        return jnp.einsum("bnts,bsnh->btnh", p, vv)

    xs = [jnp.asarray(leaves[n], dtype) for n in names]
    _, vjp = jax.vjp(f, *xs)
    return dict(zip(names, vjp(jnp.asarray(grad_out, dtype))))


_DEFAULT_GRAD = {("mask-bias", "bfloat16"), ("window-lengths", "float16")}


@pytest.mark.parametrize("form,dtype", [pytest.param(f, d, marks=() if (f, d) in _DEFAULT_GRAD else SLOW)
                                        for f in FORMS for d in ("float16", "bfloat16")])
def test_gradients_within_a_multiple_of_a_low_precision_reference(form, dtype):
    leaves, grad_out, kw = _call(form, seed=len(form))
    rounded = {n: np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)) for n, x in leaves.items()}
    g = np.asarray(jnp.asarray(grad_out, dtype).astype(jnp.float32))
    with jax.enable_x64(True):
        exact = {n: np.asarray(x, np.float64) for n, x in _grads(rounded, g, kw, jnp.float64, "unfused").items()}
    fused = _grads(rounded, g, kw, dtype, "pallas")
    low = _low_precision(rounded, g, kw, dtype)
    eps = float(jnp.finfo(dtype).eps)
    for name, want in exact.items():
        err = float(np.abs(np.asarray(fused[name], np.float64) - want).max())
        ref_err = float(np.abs(np.asarray(low[name], np.float64) - want).max())
        floor = float(np.abs(want).max()) * eps
        assert err <= RATIO * max(ref_err, floor), f"d{name}: {err:.3g} against the reference's {ref_err:.3g}"


def _qkv(seed, dist="normal", dtype="float16", shape=SHAPE):
    from .inputs import make_qkv

    return make_qkv(seed, dist, framework="jax", dtype=dtype, shape=dict(shape))


def _backward_counts(site, shape=SHAPE, jit=False, **kw):
    counters.reset()
    q, k, v = _qkv(kw.pop("seed", 0), kw.pop("dist", "normal"), kw.pop("dtype", "float16"), shape)
    g = jax.random.normal(jax.random.PRNGKey(5), q.shape, jnp.float32)

    def loss(q, k, v):
        out = ftattn_jax.attention(q, k, v, implementation="pallas", site=site, **kw)[0]
        return jnp.sum(out.astype(jnp.float32) * g)

    grad = jax.grad(loss, argnums=(0, 1, 2))
    grads = (jax.jit(grad) if jit else grad)(q, k, v)
    return counters.read().get(f"{site} (backward)", {"detected": 0, "calls": 0}), grads


def _dists():
    from ftattn_spec.inputs import ALL_DISTRIBUTIONS

    for dist in ALL_DISTRIBUTIONS:
        yield pytest.param(dist, marks=() if dist == "huge" else SLOW)


@pytest.mark.parametrize("dist", list(_dists()))
def test_clean_backward_never_flagged(dist):
    counts, grads = _backward_counts("clean", SMALL, dist=dist, is_causal=True, seed=11)
    assert counts == {"detected": 0, "calls": 1}
    assert all(bool(jnp.isfinite(g).all()) for g in grads)


BACKWARD_FAULTS = [  # (site, index, replica[, bit]) as in the PyTorch tests (index b, n, i, j; dk/dv: b, kh, j, h)
    ("bwd_scores", (1, 3, 20, 4), 0), ("bwd_scores", (2, 1, 20, 11), 1),
    ("bwd_probs", (0, 1, 20, 11), 0), ("bwd_probs", (1, 2, 17, 7), 1),
    ("bwd_dp", (2, 2, 17, 9), 0), ("bwd_dp", (0, 0, 20, 13), 1),
    ("bwd_ds", (1, 0, 19, 2), 0), ("bwd_ds", (2, 3, 15, 11), 1),
    ("bwd_dq", (1, 1, 13, 5), 0), ("bwd_dk", (0, 1, 7, 5), 0), ("bwd_dv", (2, 0, 20, 3), 0),
]


@pytest.mark.parametrize("site,index,replica,bit", [
    pytest.param(*f, *((27,) if len(f) == 3 else ()), marks=() if f[0] in ("bwd_dv", "bwd_ds") else SLOW)
    for f in BACKWARD_FAULTS], ids=lambda x: str(x))
def test_a_fault_at_each_backward_site_is_detected(site, index, replica, bit):
    from ftattn_spec import Fault

    counts, _ = _backward_counts("faulty", SMALL, fault=Fault(site, index, bit=bit, replica=replica), is_causal=True)
    assert counts == {"detected": 1, "calls": 1}


@pytest.mark.parametrize("site,index,check,where", [
    ("bwd_dq", (1, 1, 13, 5), "bwd_dq", (1, 1, 13)),
    ("bwd_dv", (2, 0, 20, 3), "bwd_dv", (2, 0, 20)),
])
def test_a_backward_detection_is_located(site, index, check, where):
    """The backward's verdict names its check and (batch, head, row or key), as a forward's does."""
    from ftattn_spec import Fault
    from ftattn_spec.tally import Where

    _backward_counts("located", SMALL, fault=Fault(site, index, bit=27), is_causal=True)
    assert counters.tally()["located (backward)"].first == Where(check, where)


def _barrier_inputs(jaxpr) -> list:
    """The avals every ``optimization_barrier`` in ``jaxpr`` (and its sub-jaxprs) takes."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "optimization_barrier":
            found += [(tuple(x.aval.shape), x.aval.dtype.name) for x in eqn.invars]
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _barrier_inputs(inner)
    return found


def test_the_backward_reads_the_stored_cotangent():
    """A cotangent cast from float32 just before the backward (the loss's) reaches the kernel and
    the float32 side sums as the same stored values: both read it after an optimization barrier,
    which XLA's GPU compiler cannot see through (its excess-precision pass would otherwise hand
    the sums the unrounded float32 values; a clean step was flagged so on the H200)."""
    q, k, v = _qkv(0, shape=SMALL)
    g = jax.random.normal(jax.random.PRNGKey(5), q.shape, jnp.float32)

    def loss(q32, k, v):
        out = ftattn_jax.attention(q32.astype(q.dtype), k, v, implementation="pallas")[0]
        return jnp.sum(out.astype(jnp.float32) * g)

    got = _barrier_inputs(jax.make_jaxpr(jax.grad(loss))(q.astype(jnp.float32), k, v).jaxpr)
    query = (tuple(q.shape), q.dtype.name)
    assert got.count(query) >= 4, got  # forward: the query; backward: query, output and cotangent


@pytest.mark.parametrize("bit", [18])
def test_a_small_probs_fault_in_the_dkdv_kernel_is_detected(bit):
    """As in PyTorch: an error far below the per-head total's floor, seen per key."""
    from ftattn_spec import Fault

    fault = Fault("bwd_probs", (0, 3, 90, 61), bit=bit, replica=1)
    counts, _ = _backward_counts("faulty", dict(SHAPE, B=1, T=150, S=140), seed=3, fault=fault, is_causal=True)
    assert counts == {"detected": 1, "calls": 1}


def test_backward_policies_nan_correct_under_jit():
    from ftattn_spec import Fault

    fault = Fault("bwd_dq", (1, 1, 13, 5), bit=27)
    _, clean = _backward_counts("p", SMALL, jit=True, is_causal=True)
    counts, poisoned = _backward_counts("p", SMALL, jit=True, is_causal=True, fault=fault, on_fault="nan")
    assert counts == {"detected": 1, "calls": 1}
    dq = np.asarray(poisoned[0], np.float32)  # B T N H
    assert np.isnan(dq[1, 13, 1]).all() and int(np.isnan(dq).any(-1).sum()) == 1
    assert all(bool(jnp.isfinite(g).all()) for g in poisoned[1:])
    counts, fixed = _backward_counts("p", SMALL, jit=True, is_causal=True, fault=fault, on_fault="correct")
    assert counts["detected"] == 1
    for a, b in zip(fixed, clean):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_backward_raise_poisons_and_warns():
    """A traced backward cannot raise: under ``"raise"`` the implicated rows are NaN and a
    ``FaultWarning`` names the site (docs/faults.md, "The backward's verdict")."""
    from ftattn_spec import Fault
    from ftattn_spec.policy import FaultWarning

    with pytest.warns(FaultWarning, match="r \\(backward\\)"):
        counts, grads = _backward_counts("r", SMALL, is_causal=True, fault=Fault("bwd_dv", (2, 0, 20, 3), bit=27),
                                         on_fault="raise")
    assert counts["detected"] == 1
    assert bool(jnp.isnan(grads[2][2, 20, 0]).all()) and bool(jnp.isfinite(grads[0]).all())


def test_unchecked_scheme_runs_the_fused_backward_without_checks():
    counts, grads = _backward_counts("base", SMALL, is_causal=True, scheme="baseline")
    assert counts == {"detected": 0, "calls": 0}  # nothing checked, nothing counted
    _, checked = _backward_counts("base", SMALL, is_causal=True)
    for a, b in zip(grads, checked):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dropin_gradients_match_jax_nn_with_an_empty_row_and_a_bias():
    """The drop-in through the fused backward against ``jax.nn.dot_product_attention``'s own
    gradient (XLA, float32): a row whose mask is all False takes the mean of every value row
    (jax.nn's rule), so its dO reaches every value row; the bias gets its gradient."""
    from ftattn_jax.nn import dot_product_attention

    B, T, S, N, K, H = 2, 19, 23, 4, 2, 16
    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
               for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
    bias = jnp.asarray(rng.standard_normal((1, N, T, S)), jnp.float32)
    mask = np.asarray(rng.random((B, 1, T, S)) > 0.4)
    mask[1, 0, 5] = False  # an empty row
    mask = jnp.asarray(mask)
    g = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)

    def loss(f):
        return lambda q, k, v, b: jnp.sum(f(q, k, v, bias=b, mask=mask) * g)

    half = [x.astype(jnp.float16) for x in (q, k, v, bias)]
    fused = jax.grad(loss(lambda *a, **kw: dot_product_attention(*a, implementation="pallas", **kw)),
                     argnums=(0, 1, 2, 3))(*half)
    plain = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2, 3))(
        *(x.astype(jnp.float32) for x in half))
    for name, a, b in zip(("q", "k", "v", "bias"), fused, plain):
        assert a.shape == b.shape and a.dtype == jnp.float16
        b = np.asarray(b)  # float16 products and P: about 1e-3 of the largest gradient
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=1e-2 * np.abs(b).max(), rtol=0,
                                   err_msg=f"d{name}")
