"""The PyTorch ring's time at P=1 (one NCCL rank) beside cuDNN and the one-device default: forward
plus backward one call at a time (CUDA events, median of 7 after 2 warm-ups) and pipelined (10
calls back to back, then one sync: what a training loop that runs ahead sees), and the host time
of one call (until it returns). Run once with the code before the change (PYTHONPATH=old tree)
and once after; each run's ratios are against cuDNN in the same process.
    PYTHONPATH=. python3 docs/data/ring-host-h200-2026-12-03/tring_host.py [profile]"""
import sys, time, warnings, cProfile, pstats, io
warnings.filterwarnings("ignore")
import numpy as np
import torch, torch.distributed as dist
from torch.nn.attention import sdpa_kernel, SDPBackend
import ftattn_torch
from ftattn_torch.distributed import ring_attention
T0 = time.time()
def say(*a): print(f"[{time.time()-T0:4.0f}s]", *a, flush=True)
say("torch", torch.__version__, torch.cuda.get_device_name(), ftattn_torch.__file__)
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29541", rank=0, world_size=1)
def med(f, n=7):
    f(); f(); torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); f(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return float(np.median(ts))
def piped(f, n=10):
    f(); torch.cuda.synchronize()
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            f()
        torch.cuda.synchronize(); ts.append((time.perf_counter() - t) / n * 1e3)
    return float(np.median(ts))
def host(f, n=5):
    f(); torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        torch.cuda.synchronize(); t = time.perf_counter(); f(); ts.append((time.perf_counter() - t) * 1e3)
    return float(np.median(ts))
SHAPES = ((1, 16, 8, 4096, 128, torch.bfloat16, False), (1, 16, 8, 8192, 128, torch.bfloat16, False),
          (2, 32, 32, 4096, 64, torch.float16, True))
for B, N, K, T, H, dt, causal in (SHAPES[:1] if "only-profile" in sys.argv[1:] else SHAPES):
    q = torch.randn(B, N, T, H, device="cuda", dtype=dt, requires_grad=True)
    k, v = (torch.randn(B, K, T, H, device="cuda", dtype=dt, requires_grad=True) for _ in range(2))
    g = torch.randn(B, N, T, H, device="cuda", dtype=dt)
    def ring():
        o, _ = ring_attention(q, k, v, is_causal=causal)
        torch.autograd.grad(o, (q, k, v), g)
    def one():
        o, _ = ftattn_torch.attention(q, k, v, is_causal=causal)
        torch.autograd.grad(o, (q, k, v), g)
    kr, vr = (x.detach().repeat_interleave(N // K, 1).requires_grad_() for x in (k, v))
    def cud():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=causal)
        torch.autograd.grad(o, (q, kr, vr), g)
    res = {n: (med(f), piped(f), host(f)) for n, f in (("cudnn", cud), ("one-device", one), ("ring", ring))}
    c, cp = res["cudnn"][0], res["cudnn"][1]
    say(f"[B={B} N={N} K={K} T={T} H={H} {str(dt)[6:]} causal={causal:d}] fwd+bwd ms, one call (x cudnn) / pipelined (x cudnn) / host of one call: "
        + "; ".join(f"{n} {t:.2f} ({c/t:.2f}x) / {p:.2f} ({cp/p:.2f}x) / {h:.2f}" for n, (t, p, h) in res.items()))
if "profile" in sys.argv[1:] or "only-profile" in sys.argv[1:]:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(5):
        ring()
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(45); print(s.getvalue()[:9000])
dist.destroy_process_group()
