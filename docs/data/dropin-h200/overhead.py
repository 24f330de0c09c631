"""Host overhead of the PyTorch drop-in, per layer. Run with PYTHONPATH=<tree>:.gpu/pylib."""
import cProfile, io, os, pstats, sys, time
import torch
import torch.nn.functional as F
import ftattn_torch as ft
from ftattn_torch.fused import launch
tag = os.environ.get("TAG", "?")
dev = "cuda"; torch.manual_seed(0)

def host(fn, n=200):
    for _ in range(5): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    h = (time.perf_counter() - t) / n * 1e3
    torch.cuda.synchronize(); w = (time.perf_counter() - t) / n * 1e3
    return h, w

def dev_ms(fn, n=20):
    for _ in range(3): fn()
    torch.cuda.synchronize(); ts = []
    for _ in range(n):
        s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    ts.sort(); return ts[len(ts) // 2]

for B, N, T, H in [(1, 1, 128, 128), (2, 16, 2048, 128)]:
    q, k, v = (torch.randn(B, N, T, H, device=dev, dtype=torch.float16) for _ in range(3))
    i, j = torch.arange(T, device=dev)[:, None], torch.arange(T, device=dev)[None, :]
    hf = ((j <= i)[None, None] & (torch.arange(T, device=dev) < T - 3)[None, None, None, :]).expand(B, 1, T, T)
    for form, am, c in [("causal", None, True), ("hf-mask", hf, False)]:
        masks = launch.Masks(mask=am) if am is not None else None
        fns = {
            "F.sdpa": lambda: F.scaled_dot_product_attention(q, k, v, am, is_causal=c),
            "launch.forward": lambda: launch.forward(q, k, v, scale=H ** -0.5, is_causal=c, checks_on=True, masks=masks),
            "attention(triton)": lambda: ft.attention(q, k, v, mask=am, is_causal=c, implementation="triton"),
            "sdpa default": lambda: ft.scaled_dot_product_attention(q, k, v, am, is_causal=c),
        }
        for name, fn in fns.items():
            h, w = host(fn); d = dev_ms(fn)
            print(f"{tag:4s} B{B} N{N} T{T} {form:8s} {name:18s} host/call {h:7.3f} ms  wall/call {w:7.3f} ms  events {d:7.3f} ms", flush=True)
    if T == 128:
        pr = cProfile.Profile(); pr.enable()
        for _ in range(200): ft.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.cuda.synchronize(); pr.disable()
        s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22)
        print("\n".join(l[:150] for l in s.getvalue().splitlines()[6:34]))
