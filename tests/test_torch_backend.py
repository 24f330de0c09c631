"""PyTorch-specific behaviour: devices, TF32 awareness, no autograd graph."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import ftattn_torch  # noqa: E402

from .conftest import SHAPE  # noqa: E402
from .inputs import make_qkv  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _inputs(seed, dtype=torch.float16, device="cpu", dist="normal", shape=SHAPE):
    return make_qkv(seed, dist, framework="torch", dtype=str(dtype).removeprefix("torch."), device=device, shape=shape)


@pytest.mark.parametrize("device", DEVICES)
def test_report_lives_on_the_input_device(device):
    out, rep = ftattn_torch.attention(*_inputs(0, device=device))
    assert out.device.type == device and out.dtype == torch.float16
    assert rep.detected.device.type == device and rep.detected.dtype == torch.bool and rep.detected.dim() == 0
    for c in rep.checks.values():
        assert all(isinstance(x, torch.Tensor) and x.device.type == device for x in c)


def test_report_has_no_autograd_graph_and_out_has_the_right_gradient():
    """Not yet a promise of the API (issue 6), but nothing may break it silently."""
    q, k, v = (x.double().float().requires_grad_() for x in _inputs(1, dtype=torch.float32))
    for scheme in ("baseline", "full"):
        out, rep = ftattn_torch.attention(q, k, v, scheme=scheme, is_causal=True)
        assert all(not x.requires_grad for c in rep.checks.values() for x in c)
        g = torch.autograd.grad(out.sum(), (q, k, v))
        kk, vv = (x.repeat_interleave(SHAPE["N"] // SHAPE["K"], dim=1) for x in (k, v))
        ref = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True)
        g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_mismatched_devices_are_named():
    if not torch.cuda.is_available():
        q, k, v = _inputs(2)
        meta = torch.empty_like(k, device="meta")
        with pytest.raises((ValueError, TypeError), match="device"):
            ftattn_torch.attention(q, meta, v)
    else:
        q, k, v = _inputs(2)
        with pytest.raises(ValueError, match="device"):
            ftattn_torch.attention(q, k.cuda(), v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 exists on CUDA only")
def test_tf32_widens_float32_thresholds_and_stays_clean():
    q, k, v = _inputs(3, dtype=torch.float32, device="cuda", dist="uniform",
                      shape=dict(B=2, N=4, K=2, T=512, S=640, H=64))
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        _, strict = ftattn_torch.attention(q, k, v)
        torch.set_float32_matmul_precision("high")
        _, loose = ftattn_torch.attention(q, k, v)
    finally:
        torch.set_float32_matmul_precision(prev)
    assert not bool(strict.detected) and not bool(loose.detected)
    for name in ("qk_row", "pv_row"):
        assert torch.all(loose.checks[name].threshold > 10 * strict.checks[name].threshold), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_matches_cpu(dtype):
    q, k, v = _inputs(4, dtype=dtype)
    o_cpu, r_cpu = ftattn_torch.attention(q, k, v, is_causal=True)
    o_gpu, r_gpu = ftattn_torch.attention(q.cuda(), k.cuda(), v.cuda(), is_causal=True)
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}[dtype]
    np.testing.assert_allclose(o_gpu.float().cpu().numpy(), o_cpu.float().numpy(), atol=tol, rtol=tol)
    assert not bool(r_gpu.detected)


@pytest.mark.parametrize("n", [1, 2, 7, 16, 41, 100, 257])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_blocked_sums_match_plain_sums(n, dim):
    from ftattn_torch.unfused.checks import blocked_cumsum, blocked_sum

    x = torch.randn(3, n, 5, dtype=torch.float64).movedim(1, dim)
    torch.testing.assert_close(blocked_sum(x, dim), x.sum(dim))
    torch.testing.assert_close(blocked_cumsum(x, dim), x.cumsum(dim))
