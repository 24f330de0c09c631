"""The fused backward of ``implementation="triton"`` (``ftattn_torch/fused/triton_backward.py``).

As FlashAttention's tests: each gradient's error against float64 stays within a small
multiple of the error of a low-precision reference (plain attention computed in the input
dtype, from the same rounded inputs), for every mask form, GQA and T ≠ S. And the
backward keeps nothing of size T·S: what the forward saves is O(B·N·T) beyond the inputs.

Interpreted on the CPU (``TRITON_INTERPRET=1``, ``tests/conftest.py``), compiled with
``FTATTN_TEST_TORCH_DEVICE=cuda``.
"""

from __future__ import annotations

import pytest

from .fused_cases import SHAPE, triton_device

DEVICE = triton_device()

import torch  # noqa: E402

import ftattn_torch as ft  # noqa: E402

#: the kernel's error may be this many times the low-precision reference's (FlashAttention's tests use 2)
RATIO = 3.0

FORMS = {
    "none": {},
    "causal": {"is_causal": True},
    "window-lengths": {"local_window_size": (5, 3), "query_seq_lengths": [30, 37, 12],
                       "key_value_seq_lengths": [45, 20, 33]},
    "mask-bias": {"mask": "dense", "bias": "dense"},
    "causal-T>S": {"is_causal": True, "T": 45, "S": 29},
}


def _call(form: str, dtype, seed: int):
    kw = dict(FORMS[form])
    shape = dict(SHAPE)
    shape.update({a: kw.pop(a) for a in ("T", "S") if a in kw})
    B, N, K, T, S, H = (shape[a] for a in "BNKTSH")
    assert len({B, N, K, T, S, H}) == 6  # a swapped axis fails
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, T, H, generator=g)
    k = torch.randn(B, K, S, H, generator=g)
    v = torch.randn(B, K, S, H, generator=g)
    grad_out = torch.randn(B, N, T, H, generator=g)
    if kw.get("mask") == "dense":
        kw["mask"] = (torch.rand(B, 1, T, S, generator=g) > 0.3).to(DEVICE)
    if kw.get("bias") == "dense":
        kw["bias"] = torch.randn(1, N, T, S, generator=g)
    for name in ("query_seq_lengths", "key_value_seq_lengths"):
        if name in kw:
            kw[name] = torch.tensor(kw[name], device=DEVICE)
    leaves = {"q": q, "k": k, "v": v}
    if "bias" in kw:
        leaves["bias"] = kw.pop("bias")
    return leaves, grad_out, kw


def _grads(leaves, grad_out, kw, dtype, implementation):
    xs = {n: x.to(DEVICE, dtype).requires_grad_(True) for n, x in leaves.items()}
    out, report = ft.attention(xs["q"], xs["k"], xs["v"], bias=xs.get("bias"), implementation=implementation,
                               **kw)
    grads = torch.autograd.grad(out, list(xs.values()), grad_out.to(DEVICE, dtype))
    return dict(zip(xs, grads)), report


def _low_precision(leaves, grad_out, kw, dtype):
    """Plain attention with every product and the softmax's output in ``dtype`` (float32
    exponentials), from the same rounded inputs: the low-precision reference."""
    xs = {n: x.to(dtype).requires_grad_(True) for n, x in leaves.items()}
    q, k, v = xs["q"], xs["k"], xs["v"]
    G = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = (q @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if "bias" in xs:
        s = s + xs["bias"]
    B, N, T, S = s.shape
    i, j = torch.arange(T)[:, None], torch.arange(S)[None, :]
    keep = torch.ones(B, 1, T, S, dtype=torch.bool)
    if kw.get("is_causal"):
        keep = keep & (j <= i)
    if "local_window_size" in kw:
        left, right = kw["local_window_size"]
        keep = keep & (j >= i - left) & (j <= i + right)
    if "query_seq_lengths" in kw:
        keep = keep & (i[None, None] < kw["query_seq_lengths"].cpu()[:, None, None, None])
    if "key_value_seq_lengths" in kw:
        keep = keep & (j[None, None] < kw["key_value_seq_lengths"].cpu()[:, None, None, None])
    if "mask" in kw:
        keep = keep & kw["mask"].cpu()
    p = torch.softmax(s.float().masked_fill(~keep, -torch.inf), -1).nan_to_num(0.0).to(dtype)
    out = p @ vv
    grads = torch.autograd.grad(out, list(xs.values()), grad_out.to(dtype))
    return dict(zip(xs, grads))


_DEFAULT_GRAD = {("mask-bias", "bfloat16"), ("window-lengths", "float16")}
SLOW = pytest.mark.slow


@pytest.mark.parametrize("form,dtype", [pytest.param(f, d, marks=() if (f, d) in _DEFAULT_GRAD else SLOW)
                                        for f in FORMS for d in ("float16", "bfloat16")])
def test_gradients_within_a_multiple_of_a_low_precision_reference(form, dtype):
    dt = getattr(torch, dtype)
    leaves, grad_out, kw = _call(form, dt, seed=len(form))
    rounded = {n: x.to(dt) for n, x in leaves.items()}
    exact, _ = _grads({n: x.double() for n, x in rounded.items()}, grad_out.to(dt).double(), kw, torch.float64,
                      "unfused")
    fused, report = _grads(rounded, grad_out.to(dt), kw, dt, "triton")
    assert report.ran.implementation == "triton" and not bool(report.detected)
    low = _low_precision({n: x.float() for n, x in rounded.items()}, grad_out.to(dt).float(), kw, dt)
    for name in exact:
        want = exact[name].cpu()
        err = float((fused[name].double().cpu() - want).abs().max())
        ref_err = float((low[name].double() - want).abs().max())
        floor = float(want.abs().max()) * torch.finfo(dt).eps  # a reference that happens to be exact
        assert err <= RATIO * max(ref_err, floor), f"d{name}: {err:.3g} against the reference's {ref_err:.3g}"


def test_backward_keeps_nothing_of_size_T_times_S():
    """What the fused forward saves for the backward: the inputs, the output and the per-row
    log-sum-exp; nothing of T·S (the old backward built a (B, T, S) mask and (B, N, T, S) P)."""
    shape = dict(SHAPE, T=33, S=40)
    B, N, K, T, S, H = (shape[a] for a in "BNKTSH")
    q = torch.randn(B, N, T, H, device=DEVICE, dtype=torch.float16, requires_grad=True)
    k = torch.randn(B, K, S, H, device=DEVICE, dtype=torch.float16, requires_grad=True)
    v = torch.randn(B, K, S, H, device=DEVICE, dtype=torch.float16, requires_grad=True)
    out, _ = ft.attention(q, k, v, is_causal=True, local_window_size=(9, 0), implementation="triton")
    saved = [t for t in out.grad_fn.saved_tensors if t is not None]
    assert max(t.numel() for t in saved) <= max(x.numel() for x in (q, k, v))
    assert any(t.shape == (B, N, T) and t.dtype == torch.float32 for t in saved)  # the log-sum-exp
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


# ---- the backward's checks ---------------------------------------------------------------------

BACKWARD_FAULTS = [  # (site, index, replica): every site, both kernels where a site is computed twice
    ("bwd_scores", (1, 3, 30, 4), 0), ("bwd_scores", (2, 1, 20, 11), 1),
    ("bwd_probs", (0, 1, 20, 11), 0), ("bwd_probs", (1, 2, 33, 17), 1),
    ("bwd_dp", (2, 2, 17, 9), 0), ("bwd_dp", (0, 0, 36, 30), 1),
    ("bwd_ds", (1, 0, 36, 2), 0), ("bwd_ds", (2, 3, 25, 21), 1),
    ("bwd_dq", (1, 1, 33, 5), 0), ("bwd_dk", (0, 1, 7, 5), 0), ("bwd_dv", (2, 0, 30, 3), 0),
]


#: a smaller shape for the tests that run the backward several times (still GQA, T ≠ S, partial tiles)
SMALL = dict(SHAPE, T=21, S=26)


def _qkv(seed, dist="normal", dtype="float16", shape=SHAPE):
    from .inputs import make_qkv

    shape = dict(shape)
    return [x.requires_grad_(True) for x in make_qkv(seed, dist, framework="torch", dtype=dtype, device=DEVICE,
                                                         shape=shape)]


def _backward_counts(site, shape=SHAPE, **kw):
    ft.counters.reset()
    q, k, v = _qkv(kw.pop("seed", 0), kw.pop("dist", "normal"), kw.pop("dtype", "float16"), shape)
    out, _ = ft.attention(q, k, v, implementation="triton", site=site, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)
    out.backward(g)
    return ft.counters.read()[f"{site} (backward)"], (q.grad, k.grad, v.grad)


def _dists():
    from ftattn_spec.inputs import ALL_DISTRIBUTIONS

    for dist in ALL_DISTRIBUTIONS:
        for causal in (False, True):
            quick = (dist, causal) == ("huge", True)
            yield pytest.param(dist, causal, marks=() if quick else SLOW)


@pytest.mark.parametrize("dist,is_causal", list(_dists()))
def test_clean_backward_never_flagged(dist, is_causal):
    counts, grads = _backward_counts("clean", dist=dist, is_causal=is_causal, seed=11)
    assert counts == {"detected": 0, "calls": 1}
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("site,index,replica,bit", [pytest.param(*f, *((27,) if len(f) == 3 else ()),
                                                              marks=() if f[0] == "bwd_dv" or f[:2] == ("bwd_ds", (2, 3, 25, 21)) else SLOW)
                                                 for i, f in enumerate(BACKWARD_FAULTS)], ids=lambda x: str(x))
def test_a_fault_at_each_backward_site_is_detected(site, index, replica, bit):
    from ftattn_spec import Fault

    fault = Fault(site, index, bit=bit, replica=replica)
    counts, _ = _backward_counts("faulty", fault=fault, is_causal=True)
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
    assert ft.counters.tally()["located (backward)"].first == Where(check, where)


#: longer sequences, where the dK/dV kernel's per-head-group total of P has a floor above a
#: small error in one p (20x its threshold in this probe; the per-key check sees it)
LONG = dict(SHAPE, B=1, T=150, S=140)


@pytest.mark.parametrize("bit", [18, pytest.param(22, marks=SLOW)])
def test_a_small_probs_fault_in_the_dkdv_kernel_is_flagged_at_its_key(bit):
    from ftattn_spec import Fault
    from ftattn_spec.faults import FaultDetected

    q, k, v = _qkv(3, shape=LONG)
    fault = Fault("bwd_probs", (0, 3, 90, 61), bit=bit, replica=1)
    out, _ = ft.attention(q, k, v, implementation="triton", is_causal=True, fault=fault, on_fault="raise")
    with pytest.raises(FaultDetected) as caught:
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out))
    checks = caught.value.report.checks
    # query head 3 reads kv head 3 // (N // K) = 1
    assert checks["bwd_softmax_col"].flagged.nonzero().tolist() == [[0, 1, 61]]
    group = checks["bwd_softmax_kv"]
    assert not bool(group.flagged.any())  # below the group total's floor: only the per-key check sees it


def test_backward_policies_raise_nan_correct():
    from ftattn_spec import Fault
    from ftattn_spec.faults import FaultDetected

    fault = Fault("bwd_dq", (1, 1, 13, 5), bit=27)
    _, clean = _backward_counts("p", SMALL, is_causal=True)
    with pytest.raises(FaultDetected):
        _backward_counts("p", SMALL, is_causal=True, fault=fault, on_fault="raise")
    _, poisoned = _backward_counts("p", SMALL, is_causal=True, fault=fault, on_fault="nan")
    assert torch.isnan(poisoned[0][1, 1, 13]).all() and int(torch.isnan(poisoned[0]).any(-1).sum()) == 1
    assert torch.isfinite(poisoned[1]).all() and torch.isfinite(poisoned[2]).all()
    counts, fixed = _backward_counts("p", SMALL, is_causal=True, fault=fault, on_fault="correct")
    assert counts["detected"] == 1
    for a, b in zip(fixed, clean):
        assert torch.equal(a, b)


def test_backward_sites_need_the_fused_backward():
    from ftattn_spec import Fault

    q, k, v = _qkv(0)
    with pytest.raises(ValueError, match="fault.site"):
        ft.attention(q, k, v, implementation="unfused", fault=Fault("bwd_dv", (0, 0, 1, 1), bit=3))


@pytest.mark.parametrize("with_fault", [False, pytest.param(True, marks=SLOW)])
def test_compiled_dropin_takes_the_fused_checked_backward(with_fault):
    """Under ``torch.compile(fullgraph=True)`` the SDPA drop-in's operator keeps the kernel's
    log-sum-exp and its backward is the fused one (``ftattn::sdpa_backward``): the gradients are
    those of the eager call, and a backward fault raises from ``backward()`` under ``"raise"``."""
    from ftattn_spec import Fault
    from ftattn_spec.faults import FaultDetected

    q, k, v = _qkv(3, shape=SMALL)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(q)

    def f(q, k, v, **kw):
        return ft.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, implementation="triton",
                                               **kw)

    eager = torch.autograd.grad(f(q, k, v), (q, k, v), g)
    torch._dynamo.reset()
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(q, k, v), (q, k, v), g)
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)
    if not with_fault:
        return
    fault = Fault("bwd_dv", (2, 0, 20, 3), bit=27)
    torch._dynamo.reset()
    out = torch.compile(lambda q, k, v: f(q, k, v, fault=fault, on_fault="raise"), fullgraph=True)(q, k, v)
    with pytest.raises(FaultDetected):
        out.backward(g)
    torch.library.opcheck(torch.ops.ftattn.sdpa_backward.default,
                          (q.detach(), k.detach(), v.detach(), None, compiled[0].detach(),
                           torch.zeros(q.shape[:3], device=DEVICE), g, True, 0.25, True, "report", None, None,
                           False),
                          test_utils=("test_schema", "test_faketensor"))
