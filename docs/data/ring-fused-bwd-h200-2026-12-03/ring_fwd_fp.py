"""Which check of the PyTorch ring's forward (fused blocks) flags clean inputs of larger magnitude on the
H200 (one NCCL rank): per check the largest ratio, beside the one-device fused call on the same inputs.
    PYTHONPATH=. python3 docs/data/ring-fused-bwd-h200-2026-12-03/ring_fwd_fp.py"""
import warnings
warnings.filterwarnings("ignore")
import torch, torch.distributed as dist
import ftattn_torch
from ftattn_torch.distributed import ring_attention
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29541", rank=0, world_size=1)
torch.manual_seed(0)
def worst(checks):
    return {n: round(float(torch.nan_to_num(c.residual / c.threshold, nan=float("inf")).max()), 4) for n, c in checks.items()}
for B, N, K, T, H, dt, causal, amp in ((2, 8, 2, 2048, 64, torch.float16, False, 4.0), (1, 4, 4, 1000, 32, torch.bfloat16, False, 8.0),
                                       (1, 4, 4, 1000, 32, torch.bfloat16, False, 2.0), (1, 4, 4, 1000, 32, torch.bfloat16, False, 4.0),
                                       (1, 4, 4, 1000, 128, torch.bfloat16, True, 8.0)):
    q = (amp * torch.randn(B, N, T, H, device="cuda")).to(dt)
    k, v = ((amp * torch.randn(B, K, T, H, device="cuda")).to(dt) for _ in range(2))
    with torch.no_grad():
        o, rep = ring_attention(q, k, v, is_causal=causal, implementation="triton")
        o1, rep1 = ftattn_torch.attention(q, k, v, is_causal=causal, implementation="triton", enable_gqa=True) if False else \
            ftattn_torch.attention(q, k.repeat_interleave(N // K, 1), v.repeat_interleave(N // K, 1), is_causal=causal, implementation="triton")
        od, _ = ftattn_torch.attention(q.double(), k.double().repeat_interleave(N // K, 1), v.double().repeat_interleave(N // K, 1),
                                       is_causal=causal, scheme="baseline")
    print(f"[B={B} N={N} K={K} T={T} H={H} {str(dt)[6:]} causal={causal:d} x{amp}] ring detected {bool(rep.detected)} blocks {worst(rep.blocks.checks)} "
          f"ring {worst(rep.ring)} | one-device detected {bool(rep1.detected)} {worst(rep1.checks)} | err ring {float((o.double()-od).abs().max()):.3g} "
          f"one {float((o1.double()-od).abs().max()):.3g}", flush=True)
dist.destroy_process_group()
