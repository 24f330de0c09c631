"""float64 on the unfused path, as SDPA and ``jax.nn`` accept it: computed in float64 (checked
against a float64 oracle and by the frameworks' gradient checkers), judged by the float32
tolerance model (an upper bound), faults in float64 intermediates detected; the fused
kernels refuse it, and ``"auto"`` takes the unfused path for it."""

from __future__ import annotations

import numpy as np
import pytest

from ftattn_spec import Fault
from ftattn_spec import reference as ref

from .conftest import HAVE_JAX, HAVE_TORCH

B, N, K, T, S, H = 2, 4, 2, 13, 17, 8  # every axis a different size


def _inputs(seed, b=B, n=N, k=K, t=T, s=S, h=H):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, n, t, h)), rng.standard_normal((b, k, s, h)), rng.standard_normal((b, k, s, h)))


SMALL = dict(b=2, n=3, k=1, t=5, s=7, h=4)  # gradient checks: every axis different, few elements


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
@pytest.mark.parametrize("kw", [{}, dict(is_causal=True), dict(mask="random"), dict(bias="random")],
                         ids=["plain", "causal", "mask", "bias"])
def test_torch_float64_is_computed_in_float64(kw):
    import torch

    import ftattn_torch

    q, k, v = _inputs(1)
    rng = np.random.default_rng(2)
    args = dict(kw)
    if kw.get("mask"):
        args["mask"] = rng.random((B, 1, T, S)) > 0.3
    if kw.get("bias"):
        args["bias"] = rng.standard_normal((N, T, S))
    o64, _, _ = ref.attention(q, k, v, is_causal=kw.get("is_causal", False), mask=args.get("mask"),
                              bias=args.get("bias"))
    t = {a: (torch.from_numpy(b) if isinstance(b, np.ndarray) else b) for a, b in args.items()}
    out, rep = ftattn_torch.attention(*(torch.from_numpy(x) for x in (q, k, v)), **t)
    assert out.dtype == torch.float64 and rep.ran.implementation == "unfused"
    assert np.max(np.abs(out.numpy() - o64)) < 1e-12  # float32 would be ~1e-7
    assert not bool(rep.detected)


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_torch_float64_gradcheck_and_faults():
    import torch

    import ftattn_torch

    q, k, v = (torch.from_numpy(x).requires_grad_(True) for x in _inputs(3, **SMALL))
    assert torch.autograd.gradcheck(lambda q, k, v: ftattn_torch.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True), (q, k, v))
    q, k, v = (torch.from_numpy(x) for x in _inputs(3))
    for f in (Fault("scores", (1, 2, 5, 3), bit=60), Fault("probs", (0, 3, 7, 2), bit=61),
              Fault("out", (1, 1, 4, 6), bit=62)):
        _, rep = ftattn_torch.attention(q, k, v, fault=f)
        assert bool(rep.detected), f
    with pytest.raises(ValueError, match="bit"):
        ftattn_torch.attention(q, k, v, fault=Fault("scores", (0, 0, 0, 0), bit=64))
    with pytest.raises(TypeError, match="float64"):  # the fused kernels refuse it, naming it
        ftattn_torch.attention(q, k, v, implementation="triton")


@pytest.mark.skipif(not HAVE_JAX, reason="needs jax")
def test_jax_float64_under_x64():
    import jax
    import jax.numpy as jnp
    from jax.test_util import check_grads

    import ftattn_jax

    q, k, v = _inputs(4)
    o64, _, _ = ref.attention(q, k, v, is_causal=True)
    with jax.enable_x64(True):
        tq, tk, tv = (jnp.asarray(x.transpose(0, 2, 1, 3)) for x in (q, k, v))
        assert tq.dtype == jnp.float64
        out, rep = ftattn_jax.attention(tq, tk, tv, is_causal=True)
        assert out.dtype == jnp.float64 and rep.ran.implementation == "unfused" and not bool(rep.detected)
        assert np.max(np.abs(np.asarray(out).transpose(0, 2, 1, 3) - o64)) < 1e-12
        small = (jnp.asarray(x.transpose(0, 2, 1, 3)) for x in _inputs(5, **SMALL))
        check_grads(jax.jit(lambda a, b, c: ftattn_jax.dot_product_attention(a, b, c, is_causal=True)), tuple(small),
                    order=1, modes=["rev"])
        _, rep = ftattn_jax.attention(tq, tk, tv, fault=Fault("scores", (1, 2, 5, 3), bit=60))
        assert bool(rep.detected)
