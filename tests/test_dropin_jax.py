"""``ftattn_jax.dot_product_attention`` against ``jax.nn.dot_product_attention``, and the Flax adapter."""

from __future__ import annotations

import numpy as np
import pytest

from ftattn_spec import Fault
from ftattn_spec import reference as ref

from .conftest import HAVE_JAX, SHAPE
from .inputs import make_qkv

pytestmark = pytest.mark.skipif(not HAVE_JAX, reason="needs jax")

B, N, K, T, S, H = (SHAPE[a] for a in "BNKTSH")


def _forms():
    rng = np.random.default_rng(0)
    shared = rng.random((B, 1, T, S)) > 0.4
    shared[1, 0, 5] = False  # a fully masked row: jax.nn spreads it over every key
    return {
        "plain": {},
        "causal": dict(is_causal=True),
        "mask": dict(mask=shared),
        "mask-per-head": dict(mask=rng.random((1, N, T, S)) > 0.5),
        "bias": dict(bias=rng.standard_normal((B, N, T, S)).astype(np.float32)),
        "bias+mask": dict(bias=rng.standard_normal((1, 1, T, S)).astype(np.float32), mask=shared),
        "window": dict(local_window_size=(3, 2)),
        "window-int+causal": dict(local_window_size=2, is_causal=True),
        "lengths": dict(query_seq_lengths=np.array([T, 20, 1], np.int32),
                        key_value_seq_lengths=np.array([S, 7, 30], np.int32)),
        "lengths+causal": dict(query_seq_lengths=np.array([5, T, 12], np.int32), is_causal=True),
    }


FORMS = _forms()


def _jnp(kw):
    import jax.numpy as jnp

    return {a: (jnp.asarray(b) if isinstance(b, np.ndarray) else b) for a, b in kw.items()}


def _inputs(seed, dtype="float32"):
    return make_qkv(seed, "normal", framework="jax", dtype=dtype)


def _logical(x):
    import jax.numpy as jnp

    return np.asarray(jnp.asarray(x, jnp.float32), np.float64).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_matches_jax_nn(form, dtype):
    import jax

    import ftattn_jax

    kw = FORMS[form]
    q, k, v = _inputs(abs(hash(form)) % 1000, dtype)
    ours, report = ftattn_jax.dot_product_attention(q, k, v, **_jnp(kw), return_report=True)
    with jax.default_matmul_precision("highest"):  # else float32 runs at TF32 on GPUs, outside the bound
        theirs = jax.nn.dot_product_attention(q, k, v, **_jnp(kw))
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    lq, lk, lv = (_logical(x) for x in (q, k, v))
    rk = dict(mask=kw.get("mask"), bias=kw.get("bias"), window=kw.get("local_window_size"),
              query_lengths=kw.get("query_seq_lengths"), key_lengths=kw.get("key_value_seq_lengths"))
    causal = kw.get("is_causal", False)
    o64, p, _ = ref.attention(lq, lk, lv, is_causal=causal, layout="torch", empty="uniform", **rk)
    bound = ref.output_bound(lq, lk, lv, p, o64, dtype=dtype, is_causal=causal, layout="torch", **rk)
    # jax.nn and ftattn compute the same function: both within the reference's bound
    assert np.all(np.abs(_logical(theirs) - o64) <= bound), "jax.nn itself"
    assert np.all(np.abs(_logical(ours) - o64) <= bound)
    assert not bool(report.detected)


def test_returns_only_the_output_by_default_and_takes_3d_inputs():
    import jax

    import ftattn_jax

    q, k, v = _inputs(1)
    out = ftattn_jax.dot_product_attention(q, k, v, is_causal=True)
    assert isinstance(out, jax.Array) and out.shape == q.shape
    out3 = ftattn_jax.dot_product_attention(q[0], k[0], v[0], is_causal=True)
    assert out3.shape == q[0].shape
    np.testing.assert_allclose(np.asarray(out3), np.asarray(out[0]), rtol=1e-6, atol=1e-6)


def test_jit_with_traced_lengths_and_a_fault():
    import jax
    import jax.numpy as jnp

    import ftattn_jax

    q, k, v = _inputs(2)

    @jax.jit
    def f(q, k, v, lengths):
        return ftattn_jax.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, return_report=True,
                                                fault=Fault("scores", (0, 1, 3, 2), bit=30))

    out, rep = f(q, k, v, jnp.array([S, 10, 5], jnp.int32))
    assert bool(rep.detected) and bool(rep.checks["qk_row"].flagged[0, 1, 3])
    out, rep = f(q, k, v, jnp.array([1, 10, 5], jnp.int32))  # key 2 of batch 0 is now masked
    assert not bool(rep.detected)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(implementation="cudnn"), ValueError, "implementation"),
    (dict(return_residual=True), ValueError, "return_residual"),
    (dict(mask=np.ones((B, 1, T, S), np.float32)), TypeError, "mask"),
    (dict(mask=np.ones((B, 2, T, S), bool)), ValueError, "mask"),
    (dict(bias=np.ones((B, N, S, T), np.float32)), ValueError, "bias"),
    (dict(query_seq_lengths=np.ones((B + 1,), np.int32)), ValueError, "query_seq_lengths"),
    (dict(key_value_seq_lengths=np.ones((B,), np.float32)), TypeError, "key_value_seq_lengths"),
    (dict(local_window_size=(-1, 2)), ValueError, "local_window_size"),
    (dict(local_window_size="wide"), TypeError, "local_window_size"),
    (dict(return_report=1), TypeError, "return_report"),
])
def test_bad_arguments_name_themselves(kwargs, error, words):
    import ftattn_jax

    q, k, v = _inputs(3)
    with pytest.raises(error, match=words):
        ftattn_jax.dot_product_attention(q, k, v, **kwargs)


# ---- Flax


def _flax_modules(kind, attention_fn):
    import jax
    from flax import linen, nnx

    D = N * H
    if kind == "nnx":
        return nnx.MultiHeadAttention(num_heads=N, in_features=D, qkv_features=D, decode=False,
                                      rngs=nnx.Rngs(0), **({"attention_fn": attention_fn} if attention_fn else {}))
    module = linen.MultiHeadDotProductAttention(num_heads=N, qkv_features=D,
                                                **({"attention_fn": attention_fn} if attention_fn else {}))
    return module, module.init(jax.random.key(1), np.zeros((2, T, D), np.float32))


def _nnx_call(module, x, **kw):
    """Call with ``sow_weights=True`` and read the sown report (``nnx.capture`` where it exists)."""
    import jax
    from flax import nnx

    if hasattr(nnx, "capture"):
        y, inter = nnx.capture(module, nnx.Intermediate)(x, sow_weights=True, **kw)
    else:  # older Flax: sow into the module, pop it out
        y = module(x, sow_weights=True, **kw)
        inter = nnx.pop(module, nnx.Intermediate)
    reports = jax.tree.leaves(inter, is_leaf=lambda r: hasattr(r, "detected"))
    return y, reports[0]


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_flax_adapter_matches_flax_attention_and_sows_the_report(kind):
    pytest.importorskip("flax")
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ftattn_jax.flax import make_attention_fn

    x = jax.random.normal(jax.random.key(3), (2, 3, T, N * H))  # two batch axes
    mask = nnx.make_causal_mask(jnp.ones((2, 3, T)))  # float 0/1, as Flax builds it
    fn = make_attention_fn()
    with jax.default_matmul_precision("highest"):  # Flax's own attention: float32, not TF32, on GPUs
        y, y0, report = _flax_both(kind, fn, x, mask)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y0), rtol=2e-5, atol=2e-5)
    assert not bool(report.detected)
    assert report.checks["qk_row"].flagged.shape == (6, N, T)  # batch axes folded: 2·3


def _flax_both(kind, fn, x, mask):
    if kind == "nnx":
        ours, theirs = _flax_modules(kind, fn), _flax_modules(kind, None)
        (y, report), y0 = _nnx_call(ours, x, mask=mask), theirs(x, mask=mask)
    else:
        module, params = _flax_modules(kind, fn)
        plain, _ = _flax_modules(kind, None)
        y, state = module.apply(params, x, mask=mask, sow_weights=True, mutable=["intermediates"])
        y0 = plain.apply(params, x, mask=mask)
        report = state["intermediates"]["ftattn_report"][0]
    return y, y0, report


def test_flax_adapter_reports_a_fault_and_refuses_dropout():
    pytest.importorskip("flax")
    import jax
    from flax import nnx

    from ftattn_jax.flax import make_attention_fn

    x = jax.random.normal(jax.random.key(4), (2, T, N * H))
    module = _flax_modules("nnx", make_attention_fn(fault=Fault("scores", (1, 2, 3, 4), bit=30)))
    _, report = _nnx_call(module, x)
    assert bool(report.detected)
    dropping = nnx.MultiHeadAttention(num_heads=N, in_features=N * H, qkv_features=N * H, decode=False,
                                      dropout_rate=0.1, rngs=nnx.Rngs(0), attention_fn=make_attention_fn())
    with pytest.raises(ValueError, match="dropout_rate"):
        dropping(x, deterministic=False, rngs=nnx.Rngs(5))
    dropping(x, deterministic=True)  # eval mode: no dropout, fine


def test_vmap_over_an_extra_axis_with_masks():
    import jax
    import jax.numpy as jnp

    import ftattn_jax

    q, k, v = _inputs(5)
    mask = jnp.asarray(np.random.default_rng(5).random((2, B, 1, T, S)) > 0.3)
    f = jax.vmap(lambda m: ftattn_jax.dot_product_attention(q, k, v, mask=m, return_report=True))
    out, rep = f(mask)
    assert out.shape == (2,) + q.shape and rep.checks["qk_row"].flagged.shape == (2, B, N, T)
    assert not bool(rep.detected.any())
    np.testing.assert_allclose(np.asarray(out[1]), np.asarray(ftattn_jax.dot_product_attention(q, k, v, mask=mask[1])),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheme", ["full", "dmr_softmax", "baseline"])
@pytest.mark.parametrize("on_fault", ["report", "correct"])
def test_strict_rank_promotion(scheme, on_fault):
    """JAX's own tests set ``jax_numpy_rank_promotion="raise"``: every mask form combined with
    another still runs (the mask algebra broadcasts 4-D operands only)."""
    import jax
    import jax.numpy as jnp

    import ftattn_jax

    q, k, v = _inputs(11)
    B, T, N, _ = q.shape
    S = k.shape[1]
    rng = np.random.default_rng(11)
    mask = jnp.asarray(rng.random((B, 1, T, S)) > 0.3)
    bias = jnp.asarray(rng.standard_normal((1, N, T, S)), jnp.float32)
    forms = [dict(is_causal=True, mask=mask), dict(local_window_size=(2, 1), mask=mask),
             dict(is_causal=True, key_value_seq_lengths=jnp.full((B,), S - 3)), dict(bias=bias, is_causal=True),
             dict(is_causal=True, mask=mask, bias=bias, local_window_size=3,
                  query_seq_lengths=jnp.full((B,), T - 2))]
    with jax.numpy_rank_promotion("raise"):
        for kw in forms:
            ftattn_jax.dot_product_attention(q, k, v, scheme=scheme, on_fault=on_fault, **kw)


def test_a_fault_plan_is_a_pytree_argument_of_jit():
    """A fault campaign inside the user's jitted step: faults are arguments, and one compilation
    serves every fault of the same sites."""
    import jax

    import ftattn_jax

    q, k, v = _inputs(12)

    @jax.jit
    def step(q, k, v, fault):
        out, rep = ftattn_jax.attention(q, k, v, fault=fault)
        return out, rep.detected, rep.located["scores"]

    clean = ftattn_jax.attention(q, k, v)[0]
    for b, n, i, j in ((1, 2, 3, 4), (0, 1, 5, 2), (2, 0, 7, 9)):
        out, detected, loc = step(q, k, v, Fault("scores", (b, n, i, j), bit=30))
        assert bool(detected) and tuple(np.asarray(loc)[b, n]) == (i, j)
        assert not np.allclose(np.asarray(out), np.asarray(clean))
    assert step._cache_size() == 1
    leaves = jax.tree_util.tree_leaves(Fault("probs", (0, 1, 2, 3), value=2.0, replica=1))
    assert leaves == [0, 1, 2, 3, 2.0]


@pytest.mark.parametrize("zero", ["B", "T", "S", "H"])
def test_zero_size_axes_like_jax_nn(zero):
    """An axis of size zero gives ``jax.nn``'s result (empty, or zeros for S = 0), under jit too,
    with a clean report whose ``ran`` says nothing was checked."""
    import jax
    import jax.numpy as jnp

    import ftattn_jax

    sizes = dict(B=2, T=5, S=7, N=3, H=8)
    sizes[zero] = 0
    q = jax.random.normal(jax.random.key(1), (sizes["B"], sizes["T"], sizes["N"], sizes["H"]))
    k = jax.random.normal(jax.random.key(2), (sizes["B"], sizes["S"], sizes["N"], sizes["H"]))
    for kw in ({}, {"is_causal": True}):
        out, report = jax.jit(lambda q, k: ftattn_jax.dot_product_attention(q, k, k, return_report=True, **kw))(q, k)
        want = jax.nn.dot_product_attention(q, k, k, **kw)
        assert out.shape == want.shape
        assert jnp.allclose(out, want)
        assert not bool(report.detected)
    assert "zero-size" in ftattn_jax.dot_product_attention(q, k, k, return_report=True)[1].ran.fallback
    with pytest.raises(ValueError, match="implementation"):
        ftattn_jax.dot_product_attention(q, k, k, implementation="pallas")
