"""The PyTorch ring's backward by the fused Triton kernels (one launch per step) against the unfused
backward it replaces, on one H200 (P=1: one NCCL rank holds the whole sequence), beside cuDNN and
the one-device fused path (ftattn_torch.attention); peak memory per variant; faults in the fused
ring backward.
    PYTHONPATH=. python3 docs/data/ring-fused-bwd-h200-2026-12-03/ring_fused_bwd.py"""
import time, warnings
warnings.filterwarnings("ignore")
import numpy as np
import torch, torch.distributed as dist
from torch.nn.attention import sdpa_kernel, SDPBackend
import ftattn_torch
from ftattn_spec import ring as spec_ring
from ftattn_spec.ring import RingFault
from ftattn_torch import FaultDetected
from ftattn_torch.distributed import ring_attention
T0 = time.time()
def say(*a): print(f"[{time.time()-T0:4.0f}s]", *a, flush=True)
say("torch", torch.__version__, torch.cuda.get_device_name())
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29537", rank=0, world_size=1)
def med(f, n=7):
    f(); f(); torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); f(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return float(np.median(ts))
def peak(f):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    f(); torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30
FUSED = spec_ring.FUSED_BACKWARD
for B, N, K, T, H, dt, causal in ((1, 16, 8, 4096, 128, torch.bfloat16, False), (1, 16, 8, 8192, 128, torch.bfloat16, False),
                                  (1, 16, 8, 8192, 128, torch.bfloat16, True), (2, 32, 32, 4096, 64, torch.float16, False)):
    q = torch.randn(B, N, T, H, device="cuda", dtype=dt, requires_grad=True)
    k, v = (torch.randn(B, K, T, H, device="cuda", dtype=dt, requires_grad=True) for _ in range(2))
    g = torch.randn(B, N, T, H, device="cuda", dtype=dt)
    res = {}
    def ring(scheme, fused):
        def fb():
            spec_ring.FUSED_BACKWARD = FUSED if fused else ()
            o, _ = ring_attention(q, k, v, scheme=scheme, is_causal=causal, implementation="triton")
            torch.autograd.grad(o, (q, k, v), g)
            spec_ring.FUSED_BACKWARD = FUSED
        return fb
    def one():
        o, _ = ftattn_torch.attention(q, k, v, is_causal=causal)
        torch.autograd.grad(o, (q, k, v), g)
    kr, vr = (x.detach().repeat_interleave(N // K, 1).requires_grad_() for x in (k, v))
    def cud():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=causal)
        torch.autograd.grad(o, (q, kr, vr), g)
    for name, f in (("cudnn", cud), ("one-device default", one), ("ring full, unfused bwd", ring("full", False)),
                    ("ring full, fused bwd", ring("full", True)), ("ring baseline, unfused bwd", ring("baseline", False)),
                    ("ring baseline, fused bwd", ring("baseline", True))):
        res[name] = (med(f), peak(f))
    c = res["cudnn"][0]
    say(f"[B={B} N={N} K={K} T={T} H={H} {str(dt)[6:]} causal={causal:d}] fwd+bwd ms (x cudnn, peak GiB): " + "; ".join(
        f"{n} {t:.2f} ({c/t:.2f}x, {m:.2f})" for n, (t, m) in res.items())
        + f" | fused/unfused full {res['ring full, fused bwd'][0]/res['ring full, unfused bwd'][0]:.3f}")
for f in (RingFault("bwd_dq", (0, 3, 1000, 5), step=0, value=7.0), RingFault("bwd_probs", (0, 5, 77, 3000), value=0.9),
          RingFault("bwd_dk", (0, 2, 555, 9), step=0, bit=28), RingFault("bwd_dv_acc", (0, 1, 12, 7), step=0, bit=29)):
    o, rep = ring_attention(q, k, v, scheme="full", is_causal=causal, fault=f, on_fault="raise", implementation="triton")
    try:
        torch.autograd.grad(o, (q, k, v), g)
        say(f"[fault {f.site}] NOT raised")
    except FaultDetected as e:
        say(f"[fault {f.site}] raised; forward detected {bool(rep.detected)}; table {e.report.steps.tolist()}; flagged",
            {n: int(x.flagged.sum()) for n, x in e.report.blocks.checks.items() if int(x.flagged.sum())})
dist.destroy_process_group()
