"""Clean runs of the PyTorch ring's fused backward on one H200 (one NCCL rank): the largest ratio
(residual over threshold) of every backward check over several shapes, dtypes and input scales,
and the counters' verdict.
    PYTHONPATH=. python3 docs/data/ring-fused-bwd-h200-2026-12-03/ring_fused_clean.py"""
import time, warnings
warnings.filterwarnings("ignore")
import torch, torch.distributed as dist
import ftattn_torch
from ftattn_torch import ring as R
from ftattn_torch.distributed import ring_attention
T0 = time.time()
def say(*a): print(f"[{time.time()-T0:4.0f}s]", *a, flush=True)
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29539", rank=0, world_size=1)
worst = {}
orig = R._backward_report
def spy(res, *a, **kw):
    for n, x in res.ratios.items():
        worst[n] = max(worst.get(n, 0.0), float(torch.nan_to_num(x, nan=float("inf")).max()))
    return orig(res, *a, **kw)
R._backward_report = spy
torch.manual_seed(0)
for B, N, K, T, H, dt, causal, amp in ((1, 16, 8, 4096, 128, torch.bfloat16, False, 1.0),
                                       (1, 16, 8, 8192, 128, torch.bfloat16, True, 1.0),
                                       (2, 8, 2, 2048, 64, torch.float16, False, 4.0),
                                       (2, 8, 8, 3000, 128, torch.float16, True, 0.25),
                                       (1, 4, 4, 1000, 32, torch.bfloat16, False, 8.0),
                                       (3, 6, 3, 777, 64, torch.bfloat16, True, 2.0)):
    for rep in range(2):
        q = (amp * torch.randn(B, N, T, H, device="cuda")).to(dt).requires_grad_()
        k, v = ((amp * torch.randn(B, K, T, H, device="cuda")).to(dt).requires_grad_() for _ in range(2))
        g = torch.randn(B, N, T, H, device="cuda", dtype=dt)
        o, _ = ring_attention(q, k, v, is_causal=causal, implementation="triton", site=f"clean {T} {H} {str(dt)[6:]}")
        torch.autograd.grad(o, (q, k, v), g)
    say(f"[B={B} N={N} K={K} T={T} H={H} {str(dt)[6:]} causal={causal:d} x{amp}] worst so far", {n: round(x, 4) for n, x in worst.items()})
say("[counters]", {s: (t.calls, t.detected) for s, t in ftattn_torch.counters.tally().items()})
dist.destroy_process_group()
