"""Gradients through every scheme of both backends equal those of plain attention (float64 oracle)."""

from __future__ import annotations

import numpy as np
import pytest

from ftattn_spec import Fault
from ftattn_spec.inputs import draw_qkv

from .conftest import HAVE_JAX, HAVE_TORCH, SHAPE
from .inputs import scheme_params
from .grad_reference import assert_grads_close, reference_grads

B, N, K, T, S, H = (SHAPE[a] for a in "BNKTSH")
MASKS = {
    "none": {},
    "causal": dict(is_causal=True),
    "mask+bias": dict(mask=np.random.default_rng(1).random((B, 1, T, S)) > 0.3,
                      bias=np.random.default_rng(2).standard_normal((1, N, T, S)).astype(np.float32)),
    "window+lengths": dict(local_window_size=(4, 1), key_value_seq_lengths=np.array([S, 9, 20], np.int32)),
}


def _ref_kw(kw):
    return dict(is_causal=kw.get("is_causal", False), mask=kw.get("mask"), bias=kw.get("bias"),
                window=kw.get("local_window_size"), query_lengths=kw.get("query_seq_lengths"),
                key_lengths=kw.get("key_value_seq_lengths"))


def _data(seed):
    q, k, v = draw_qkv(seed, "normal", **SHAPE)
    w = np.random.default_rng(seed + 1).standard_normal((B, N, T, H)).astype(np.float32)
    return q, k, v, w


def jax_grads(q, k, v, w, kw, **extra):
    import jax
    import jax.numpy as jnp

    import ftattn_jax

    t = lambda x: jnp.asarray(x.transpose(0, 2, 1, 3))  # noqa: E731
    bias = kw.get("bias")
    rest = {a: (jnp.asarray(b) if isinstance(b, np.ndarray) else b) for a, b in kw.items() if a != "bias"}

    def loss(q, k, v, bias):
        out, _ = ftattn_jax.attention(q, k, v, bias=bias, **rest, **extra)
        return jnp.sum(out * t(w))

    argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
    g = jax.grad(loss, argnums=argnums)(t(q), t(k), t(v), None if bias is None else jnp.asarray(bias))
    back = [np.asarray(x).transpose(0, 2, 1, 3) for x in g[:3]]
    return back + ([np.asarray(g[3])] if bias is not None else [])


def torch_grads(q, k, v, w, kw, sdpa=False, **extra):
    import torch

    import ftattn_torch

    qt, kt, vt = (torch.tensor(x, dtype=torch.float32, requires_grad=True) for x in (q, k, v))
    rest = {a: (torch.from_numpy(b) if isinstance(b, np.ndarray) else b) for a, b in kw.items() if a != "bias"}
    bt = None if kw.get("bias") is None else torch.tensor(kw["bias"], requires_grad=True)
    if sdpa:
        out = ftattn_torch.scaled_dot_product_attention(qt, kt, vt, bt if bt is not None else rest.get("mask"),
                                                        is_causal=rest.get("is_causal", False), enable_gqa=True,
                                                        **extra)
    else:
        out, _ = ftattn_torch.attention(qt, kt, vt, bias=bt, **rest, **extra)
    (out * torch.tensor(w, dtype=torch.float32)).sum().backward()
    return [x.grad.numpy() for x in (qt, kt, vt)] + ([bt.grad.numpy()] if bt is not None else [])


@pytest.mark.skipif(not HAVE_JAX, reason="needs jax")
@pytest.mark.parametrize("scheme", scheme_params(slow=("abft_softmax", "abft_all")))  # checks leave grads alone
@pytest.mark.parametrize("masks", list(MASKS))
def test_jax_grad_equals_plain_attention(scheme, masks):
    q, k, v, w = _data(11)
    kw = MASKS[masks]
    want = reference_grads(q, k, v, w, **_ref_kw(kw))
    assert_grads_close(jax_grads(q, k, v, w, kw, scheme=scheme), want, name=f"{scheme}/{masks}")


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
@pytest.mark.parametrize("scheme", scheme_params(slow=("abft_softmax", "abft_all")))  # checks leave grads alone
@pytest.mark.parametrize("masks", list(MASKS))
def test_torch_grad_equals_plain_attention(scheme, masks):
    q, k, v, w = _data(12)
    kw = MASKS[masks]
    want = reference_grads(q, k, v, w, **_ref_kw(kw))
    assert_grads_close(torch_grads(q, k, v, w, kw, scheme=scheme), want, name=f"{scheme}/{masks}")


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
@pytest.mark.parametrize("masks", ["none", "causal", "mask+bias"])
def test_torch_sdpa_grad_equals_plain_attention(masks):
    q, k, v, w = _data(13)
    kw = MASKS[masks]
    if "bias" in kw:  # SDPA takes one attn_mask: the bias with the mask folded in as -inf
        kw = dict(bias=np.where(kw["mask"], kw["bias"], -np.inf).astype(np.float32))
    want = reference_grads(q, k, v, w, **_ref_kw(kw))
    assert_grads_close(torch_grads(q, k, v, w, kw, sdpa=True), want, name=masks)


@pytest.mark.parametrize("backend", [
    pytest.param("jax", marks=pytest.mark.skipif(not HAVE_JAX, reason="needs jax")),
    pytest.param("torch", marks=pytest.mark.skipif(not HAVE_TORCH, reason="needs torch"))])
@pytest.mark.parametrize("site", ["scores", "probs", "out"])
def test_corrected_fault_leaves_the_clean_gradient(backend, site):
    """``on_fault="correct"`` repairs the forward pass, and the gradient is the clean one."""
    q, k, v, w = _data(14)
    index = (1, 3, 20, 7)
    fault = Fault(site, index, value=50.0 if site != "probs" else 0.9)
    grads = jax_grads if backend == "jax" else torch_grads
    want = reference_grads(q, k, v, w, is_causal=True)
    got = grads(q, k, v, w, dict(is_causal=True), fault=fault, on_fault="correct")
    assert_grads_close(got, want, name=site)
