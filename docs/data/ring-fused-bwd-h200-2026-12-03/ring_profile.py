"""Where the PyTorch ring's checked forward and fused backward spend their time on one H200 (P=1, one NCCL rank):
torch.profiler's top operators by CUDA time, and the wall time of forward and backward against the
one-device call. PYTHONPATH=. python3 docs/data/ring-fused-bwd-h200-2026-12-03/ring_profile.py"""
import warnings
warnings.filterwarnings("ignore")
import torch, torch.distributed as dist
from torch.profiler import profile, ProfilerActivity
import ftattn_torch
from ftattn_torch.distributed import ring_attention
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29543", rank=0, world_size=1)
B, N, K, T, H = 1, 16, 8, 8192, 128
q = torch.randn(B, N, T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k, v = (torch.randn(B, K, T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
g = torch.randn(B, N, T, H, device="cuda", dtype=torch.bfloat16)
def ring():
    o, _ = ring_attention(q, k, v, implementation="triton")
    torch.autograd.grad(o, (q, k, v), g)
def one():
    o, _ = ftattn_torch.attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    torch.autograd.grad(o, (q,), g)
for f in (ring, one, ring):
    f()
torch.cuda.synchronize()
for name, f in (("ring", ring), ("one-device", one)):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            f()
        torch.cuda.synchronize()
    print(f"[{name}] top operators by CUDA time (3 calls):", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60), flush=True)
dist.destroy_process_group()
