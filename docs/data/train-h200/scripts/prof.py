"""per-kernel times of the backward: old (PYTHONPATH .gpu/old2) vs new, via torch.profiler"""
import sys, torch
import ftattn_torch as ft
from torch.profiler import profile, ProfilerActivity
B, N, T, H = 2, 16, 4096, 128
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(B, N, T, H, generator=g).to("cuda", torch.bfloat16).requires_grad_(True) for _ in range(3))
go = torch.randn(B, N, T, H, generator=g).to("cuda", torch.bfloat16)
for scheme in ("baseline", "full"):
    def step():
        o = ft.attention(q, k, v, is_causal=True, implementation="triton", scheme=scheme)[0]
        torch.autograd.backward(o, go)
        for x in (q, k, v): x.grad = None
    for _ in range(3): step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5): step()
        torch.cuda.synchronize()
    ev = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0:
            ev[e.key] = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) / 5 / 1000
    tot = sum(ev.values())
    print(f"{sys.argv[1]} {scheme}: GPU total {tot:.3f} ms/step")
    for kk, t in sorted(ev.items(), key=lambda x: -x[1])[:8]:
        print(f"   {t:8.3f} ms  {kk[:90]}")
