"""fwd+bwd grid: SDPA vs ftattn triton baseline/full. median of 10 after 3 warm-ups, same process."""
import os, sys, torch, torch.nn.functional as F
import ftattn_torch as ft
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
grid = [(dt, causal, H, T) for dt in ("bfloat16", "float16") for causal in (True,) for H in (128, 64) for T in (4096, 8192)]
grid += [("bfloat16", False, 128, 4096)]
print("dtype causal B N T H | sdpa ms | base ms (x sdpa) | full ms (x sdpa) | full/base | peak sdpa/base/full GiB", flush=True)
for dt, causal, H, T in grid:
    B, N = (2, 16) if H == 128 else (4, 16)
    dtype = getattr(torch, dt)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, N, T, H, generator=g).to("cuda", dtype).requires_grad_(True) for _ in range(3))
    go = torch.randn(B, N, T, H, generator=g).to("cuda", dtype)
    def step(f):
        def run():
            o = f(); torch.autograd.backward(o, go)
            for x in (q, k, v): x.grad = None
        return run
    fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
           "base": lambda: ft.attention(q, k, v, is_causal=causal, implementation="triton", scheme="baseline")[0],
           "full": lambda: ft.attention(q, k, v, is_causal=causal, implementation="triton")[0]}
    res = {}
    for name, f in fns.items():
        try:
            res[name] = (bench(step(f)), peak(step(f)))
        except Exception as e:
            res[name] = (float("nan"), float("nan")); print(name, "failed:", type(e).__name__, str(e)[:300], flush=True)
    s, b, fu = res["sdpa"][0], res["base"][0], res["full"][0]
    print(f"{dt} {causal:d} B{B} N{N} T{T} H{H} | {s:7.3f} | {b:7.3f} ({b/s:5.2f}x) | {fu:7.3f} ({fu/s:5.2f}x) | {fu/b:5.2f} | "
          f"{res['sdpa'][1]:.2f}/{res['base'][1]:.2f}/{res['full'][1]:.2f}", flush=True)
    del q, k, v, go; torch.cuda.empty_cache()
