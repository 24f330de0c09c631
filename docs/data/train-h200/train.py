"""fwd+bwd timing and peak memory: SDPA vs ftattn triton. PYTHONPATH=<tree>:.gpu/pylib TAG=..."""
import os, time, torch, torch.nn.functional as F
import ftattn_torch as ft
tag = os.environ.get("TAG", "?"); dev = "cuda"
def bench(fn, n=10):
    for _ in range(3): fn()
    torch.cuda.synchronize(); ts = []
    for _ in range(n):
        s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    ts.sort(); return ts[len(ts) // 2]
def peak(fn):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    fn(); torch.cuda.synchronize(); return (torch.cuda.max_memory_allocated() - base) / 2**30
shapes = [(2, 16, 4096, 128, True), (2, 16, 4096, 128, False), (2, 16, 8192, 128, True), (4, 16, 4096, 64, True)]
for B, N, T, H, causal in shapes:
    for dt in (torch.bfloat16,):
        q, k, v = (torch.randn(B, N, T, H, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
        go = torch.randn(B, N, T, H, device=dev, dtype=dt)
        def step(f):
            def run():
                o = f(); torch.autograd.backward(o, go)
                for x in (q, k, v): x.grad = None
            return run
        fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
               "triton full": lambda: ft.attention(q, k, v, is_causal=causal, implementation="triton")[0],
               "triton baseline": lambda: ft.attention(q, k, v, is_causal=causal, implementation="triton", scheme="baseline")[0]}
        res = {}
        for name, f in fns.items():
            try:
                res[name] = (bench(step(f)), peak(step(f)), bench(f))
            except Exception as e:
                res[name] = None; print(tag, name, "failed:", type(e).__name__, str(e)[:200], flush=True)
        base = res["sdpa"]
        for name, r in res.items():
            if r: print(f"{tag:4s} B{B} N{N} T{T} H{H} causal={causal:d} {name:16s} fwd+bwd {r[0]:8.3f} ms ({r[0]/base[0]:5.2f}x sdpa)  fwd {r[2]:7.3f} ms  peak extra {r[1]:6.2f} GiB", flush=True)
        del q, k, v, go
        torch.cuda.empty_cache()
