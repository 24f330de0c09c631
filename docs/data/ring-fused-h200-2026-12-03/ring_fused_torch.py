"""PyTorch ring on the GPU, one gloo process (P=1: one Triton block, its lse converted, the ring
backward): error and gradients against float32 SDPA math, beside one-process ftattn."""
import os, time, json
import torch, torch.distributed as dist
import ftattn_torch
from ftattn_torch.distributed import ring_attention
OUT = os.environ.get("OUT", "/tmp")
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
torch.manual_seed(0)
rows = []
for dtype, causal in ((torch.bfloat16, False), (torch.float16, True)):
    B, N, K, T, H = 1, 16, 8, 4096, 128
    q = torch.randn(B, N, T, H, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, K, T, H, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    g = torch.randn(B, N, T, H, device="cuda", dtype=dtype)
    o, rep = ring_attention(q, k, v, is_causal=causal)
    o.backward(g)
    got = [x.grad.float().clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    r = torch.nn.functional.scaled_dot_product_attention(qf, kf.repeat_interleave(2, 1), vf.repeat_interleave(2, 1), is_causal=causal)
    r.backward(g.float())
    one, _ = ftattn_torch.attention(q.detach(), k.detach(), v.detach(), is_causal=causal)
    row = dict(dtype=str(dtype), causal=causal, ran=rep.blocks.ran.implementation, detected=bool(rep.detected),
               err=float((o.float() - r).abs().max()), one_err=float((one.float() - r).abs().max()),
               grad_rel=[float((a - b.grad).abs().max() / b.grad.abs().max()) for a, b in zip(got, (qf, kf, vf))],
               worst=max(float((c.residual / c.threshold).max()) for c in (*rep.blocks.checks.values(), *rep.ring.values())))
    print(row, flush=True)
    rows.append(row)
json.dump(rows, open(os.path.join(OUT, "ring_fused_torch.json"), "w"), indent=1)
dist.destroy_process_group()
