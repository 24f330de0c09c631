"""``ftattn_torch.scaled_dot_product_attention`` against ``F.scaled_dot_product_attention``;
the custom op under ``opcheck`` and ``torch.compile``; ``FaultTolerantAttention``."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ftattn_spec import Fault, FaultDetected
from ftattn_spec import reference as ref

from .conftest import HAVE_TORCH, SHAPE
from .inputs import make_qkv

pytestmark = pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")

B, N, K, T, S, H = (SHAPE[a] for a in "BNKTSH")
DEVICE = os.environ.get("FTATTN_TEST_TORCH_DEVICE", "cpu")


def _masks():
    rng = np.random.default_rng(0)
    shared = rng.random((B, 1, T, S)) > 0.4
    shared[1, 0, 5] = False  # a fully masked row: SDPA gives zeros
    bias = rng.standard_normal((B, N, T, S)).astype(np.float32)
    bias[0, :, 3] = -np.inf  # a row with every logit -inf: zeros too
    return {
        "none": None,
        "bool": shared,
        "bool-2d": rng.random((T, S)) > 0.3,
        "bool-per-head": rng.random((N, T, S)) > 0.5,
        "float": bias,
        "float-broadcast": rng.standard_normal((1, 1, T, S)).astype(np.float32),
    }


MASKS = _masks()


def _inputs(seed, dtype, kv_heads=K):
    return make_qkv(seed, "normal", framework="torch", dtype=dtype, device=DEVICE, K=kv_heads)


def _np(x):
    return x.double().cpu().numpy()


@pytest.mark.parametrize("mask, causal", [(m, False) for m in MASKS] + [("none", True)])  # one or the other
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_matches_torch_sdpa(mask, causal, dtype):
    import torch
    import torch.nn.functional as F

    import ftattn_torch

    q, k, v = _inputs(abs(hash((mask, causal))) % 1000, dtype)
    am = None if MASKS[mask] is None else torch.from_numpy(MASKS[mask]).to(DEVICE)
    if am is not None and am.dtype != torch.bool:
        am = am.to(q.dtype)
    ours, report = ftattn_torch.scaled_dot_product_attention(q, k, v, am, is_causal=causal, enable_gqa=True,
                                                             return_report=True)
    theirs = F.scaled_dot_product_attention(q, k, v, am, is_causal=causal, enable_gqa=True)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    lq, lk, lv = (_np(x) for x in (q, k, v))
    kw = {} if am is None else ({"mask": _np(am) > 0} if am.dtype == torch.bool else {"bias": _np(am)})
    o64, p, _ = ref.attention(lq, lk, lv, is_causal=causal, layout="torch", **kw)
    bound = ref.output_bound(lq, lk, lv, p, o64, dtype=dtype, is_causal=causal, layout="torch", **kw)
    assert np.all(np.abs(_np(ours) - o64) <= bound)
    if DEVICE == "cpu":  # SDPA's math kernel is the function of the reference; its CUDA kernels round differently
        assert np.all(np.abs(_np(theirs) - o64) <= bound), "SDPA itself"
    else:
        assert np.all(np.abs(_np(ours) - _np(theirs)) <= bound + np.abs(_np(theirs) - o64))
    assert not bool(report.detected)


def test_returns_only_the_output_by_default_and_broadcasts_one_kv_head():
    import torch
    import torch.nn.functional as F

    import ftattn_torch

    q, k, v = _inputs(1, "float32", kv_heads=1)
    out = ftattn_torch.scaled_dot_product_attention(q, k, v, scale=0.3)  # K = 1 broadcasts, as in SDPA
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(dropout_p=0.1), ValueError, "dropout_p"),
    (dict(attn_mask="causal"), TypeError, "attn_mask"),
    (dict(is_causal=True, attn_mask=np.ones((T, S), bool)), ValueError, "attn_mask, is_causal"),
    (dict(attn_mask=np.ones((B, 2, T, S), bool)), ValueError, "attn_mask"),
    (dict(attn_mask=np.ones((T, S), np.int32)), TypeError, "attn_mask"),
    (dict(enable_gqa=False), ValueError, "enable_gqa"),
    (dict(scheme="fast"), ValueError, "scheme"),
])
def test_bad_arguments_name_themselves(kwargs, error, words):
    import torch

    import ftattn_torch

    q, k, v = _inputs(2, "float32")
    if isinstance(kwargs.get("attn_mask"), np.ndarray):
        kwargs["attn_mask"] = torch.from_numpy(kwargs["attn_mask"]).to(DEVICE)
    kwargs.setdefault("enable_gqa", True)
    with pytest.raises(error, match=words):
        ftattn_torch.scaled_dot_product_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("scheme, granularity", [("full", "vector"), ("full", "global"), ("baseline", "vector"),
                                                 ("abft_qk_row", "vector"), ("abft_all", "vector"),
                                                 ("abft_softmax", "global")])
@pytest.mark.parametrize("mask", ["none", "bool", "float"])
def test_opcheck(scheme, granularity, mask):
    import torch

    import ftattn_torch  # noqa: F401  registers the op

    q, k, v = (x.requires_grad_() for x in _inputs(3, "float32"))
    am = None if MASKS[mask] is None else torch.from_numpy(MASKS[mask]).to(DEVICE)
    if mask == "float":
        am = torch.where(torch.isinf(am), 0.0, am).requires_grad_()
    torch.library.opcheck(torch.ops.ftattn.sdpa.default,
                          (q, k, v, am, False, 0.3, scheme, granularity, "report", None, None))


def test_torch_compile_fullgraph_matches_eager():
    import torch

    import ftattn_torch

    q, k, v = _inputs(4, "float32")
    am = torch.from_numpy(MASKS["bool"]).to(DEVICE)

    def f(q, k, v, am):
        return ftattn_torch.scaled_dot_product_attention(q, k, v, am, enable_gqa=True, return_report=True)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    (oc, rc), (oe, re) = compiled(q, k, v, am), f(q, k, v, am)
    torch.testing.assert_close(oc, oe, rtol=0, atol=0)
    assert set(rc.checks) == set(re.checks) and not bool(rc.detected)
    for name in rc.checks:
        torch.testing.assert_close(rc.checks[name].threshold, re.checks[name].threshold)


def test_torch_compile_backward():
    import torch

    import ftattn_torch

    q, k, v = (x.requires_grad_() for x in _inputs(5, "float32"))
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: ftattn_torch.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                enable_gqa=True), fullgraph=True)
    f(q, k, v).square().sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    ftattn_torch.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).square().sum().backward()
    for g, x in zip(grads, (q, k, v)):  # inductor fuses differently: rounding-level differences
        assert float((g - x.grad).abs().max()) <= 1e-5 * float(x.grad.abs().max())


def test_faults_through_the_drop_in():
    import torch

    import ftattn_torch

    q, k, v = _inputs(6, "float32")
    clean = ftattn_torch.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    fault = Fault("scores", (2, 5, 30, 11), bit=30)
    out, rep = ftattn_torch.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, fault=fault,
                                                         return_report=True)
    assert bool(rep.detected) and tuple(rep.located["scores"][2, 5].tolist()) == (30, 11)
    fixed = ftattn_torch.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, fault=fault,
                                                      on_fault="correct")
    torch.testing.assert_close(fixed, clean, rtol=1e-5, atol=1e-5)
    with pytest.raises(FaultDetected):
        ftattn_torch.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, fault=fault,
                                                  on_fault="raise")


def test_module_counts_faults():
    import torch

    import ftattn_torch

    attn = ftattn_torch.FaultTolerantAttention(is_causal=True, enable_gqa=True).to(DEVICE)
    q, k, v = _inputs(7, "float32")
    attn(q, k, v)
    attn(q, k, v, fault=Fault("scores", (0, 0, 4, 2), bit=30))
    attn(q, k, v)
    assert int(attn.faults_detected) == 1 and int(attn.calls) == 3
    assert not bool(attn.last_report.detected)
    # counters are not persistent: a checkpoint saved without ftattn loads strictly, and one
    # saved with them (earlier versions) loads too
    assert "faults_detected" not in attn.state_dict()
    attn.load_state_dict({}, strict=True)
    attn.load_state_dict({"faults_detected": torch.tensor(5), "calls": torch.tensor(9)}, strict=True)
    assert int(attn.faults_detected) == 5 and int(attn.calls) == 9
    attn.reset_counters()
    assert int(attn.faults_detected) == 0
    with pytest.raises(ValueError, match="on_fault"):
        ftattn_torch.FaultTolerantAttention(on_fault="ignore")
    torch._dynamo.reset()
    compiled = torch.compile(attn, fullgraph=True)
    compiled(q, k, v)
    assert int(attn.calls) == 1


def test_three_dimensional_inputs_like_sdpa():
    import torch
    import torch.nn.functional as F

    import ftattn_torch

    q, k, v = _inputs(8, "float32")
    out = ftattn_torch.scaled_dot_product_attention(q[1], k[1, :1].expand(N, S, H), v[1, :1].expand(N, S, H),
                                                    is_causal=True)
    want = F.scaled_dot_product_attention(q[1], k[1, :1].expand(N, S, H), v[1, :1].expand(N, S, H), is_causal=True)
    assert out.shape == (N, T, H)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["rank5", "rank5-broadcast-mask", "rank2", "kv-batch-broadcast", "rank5-bias"])
def test_shapes_sdpa_takes_beyond_rank_four(form):
    """SDPA takes any number of leading axes, broadcast between query, key and value, and (T, H):
    the drop-in flattens them into B and gives SDPA's output shape and values (and gradients)."""
    import torch
    import torch.nn.functional as F

    import ftattn_torch

    g = torch.Generator().manual_seed(7)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float32)  # noqa: E731
    kw = {}
    if form == "rank2":
        q, k, v = r(5, 8), r(7, 8), r(7, 8)
    elif form == "kv-batch-broadcast":
        q, k, v = r(3, 2, 5, 8), r(1, 2, 7, 8), r(1, 2, 7, 8)
    else:
        q, k, v = r(3, 2, 4, 5, 8), r(3, 2, 4, 7, 8), r(3, 2, 4, 7, 8)
        if form == "rank5-broadcast-mask":
            q, k, v = q, k[:1], v[:1]
            kw["attn_mask"] = torch.rand(3, 1, 1, 5, 7, generator=g) > 0.3
        if form == "rank5-bias":
            kw["attn_mask"] = r(2, 1, 5, 7)
    for x in (q, k, v):
        x.requires_grad_(True)
    out, report = ftattn_torch.scaled_dot_product_attention(q, k, v, return_report=True, **kw)
    want = F.scaled_dot_product_attention(q, k, v, **kw)
    assert out.shape == want.shape
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert not bool(report.detected)
    got = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = torch.autograd.grad(want.square().sum(), (q, k, v))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("zero", ["B", "N", "T", "S", "H"])
def test_zero_size_axes_like_sdpa(zero):
    """An axis of size zero gives SDPA's result (empty, zeros, or for H = 0 the mean of the
    attended values), a clean report, and ``ran`` saying nothing was checked."""
    import torch

    import ftattn_torch

    sizes = dict(B=2, N=3, T=5, S=7, H=8)
    sizes[zero] = 0
    B, N, T, S, Hd = (sizes[a] for a in "BNTSH")
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, N, T, Hd, generator=g)
    k = torch.randn(B, N, S, Hd, generator=g)
    v = torch.randn(B, N, S, 6, generator=g) if zero == "H" else torch.randn(B, N, S, Hd, generator=g)
    mask = torch.rand(T, S, generator=g) > 0.3
    def oracle(keep):  # float64, by hand: torch 2.11's CPU SDPA dies of SIGFPE on some of these shapes
        s = (q.double() @ k.double().transpose(-1, -2)) * (Hd ** -0.5 if Hd else 1.0)
        if keep is not None and S:
            s = s.masked_fill(~keep, -torch.inf)
        p = torch.softmax(s, -1) if S and T else s
        return torch.nan_to_num(p) @ v.double()  # a fully masked row: zeros (SDPA's math path gives NaN)

    causal = torch.ones(T, S, dtype=torch.bool).tril()
    for kw, keep in (({}, None), ({"is_causal": True}, causal), ({"attn_mask": mask}, mask)):
        out, report = ftattn_torch.scaled_dot_product_attention(q, k, v, return_report=True, **kw)
        want = oracle(keep).float()
        assert out.shape == want.shape
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
        assert not bool(report.detected) and "zero-size" in report.ran.fallback
    with pytest.raises(ValueError, match="implementation"):
        ftattn_torch.scaled_dot_product_attention(q, k, v, implementation="triton")


def test_torch_compile_with_a_transposed_view():
    """Attention modules pass ``x.view(B, T, N, H).transpose(1, 2)``: the fake and the real op
    agree on the output's strides, so Inductor's stride assertion holds."""
    import torch

    import ftattn_torch

    B, T, N, H = 2, 6, 4, 16
    x = torch.randn(B, T, N * H, device=DEVICE)

    def f(x):
        q = x.view(B, T, N, H).transpose(1, 2)
        return ftattn_torch.scaled_dot_product_attention(q, q, q, is_causal=True)

    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):
        torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x), rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
def test_causal_bias_as_attn_mask(variant):
    """``torch.nn.attention.bias.causal_upper_left/lower_right`` mean what they mean in SDPA."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import bias

    import ftattn_torch

    q, k, v = _inputs(9, "float32")
    T, S = q.shape[2], k.shape[2]
    assert T != S
    cb = getattr(bias, f"causal_{variant}")(T, S)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(q.shape[1] // k.shape[1], 1),
                                          v.repeat_interleave(q.shape[1] // k.shape[1], 1), attn_mask=cb)
    got, rep = ftattn_torch.scaled_dot_product_attention(q, k, v, attn_mask=cb, enable_gqa=True, return_report=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not bool(rep.detected)
    with pytest.raises(ValueError, match="attn_mask"):
        ftattn_torch.scaled_dot_product_attention(q, k, v, attn_mask=bias.causal_upper_left(T + 1, S), enable_gqa=True)


def test_autocast_gives_sdpas_dtype():
    import torch
    import torch.nn.functional as F

    import ftattn_torch

    q = torch.randn(2, 4, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.scaled_dot_product_attention(q, q, q)
        got = ftattn_torch.scaled_dot_product_attention(q, q, q)
    assert got.dtype == want.dtype == torch.bfloat16
