"""The Triton forward's softmax_dmr on clean inputs of large logits on the H200: the worst row ratio
(residual over threshold) by replica form ("mufu", the default, or "fma") and key tile; and the two
MUFU exponentials element by element against float64.
    PYTHONPATH=. python3 docs/data/dmr-large-logits-h200-2026-12-03/dmr_rows.py"""
import numpy as np, torch, triton, triton.language as tl
from ftattn_torch.fused import launch
from ftattn_torch.fused.blocks import BlockSizes
torch.manual_seed(0)
for B, N, T, H, amp, dt in ((2, 8, 2048, 64, 4.0, torch.float16), (1, 4, 1024, 32, 8.0, torch.bfloat16),
                            (1, 4, 1024, 128, 8.0, torch.bfloat16), (1, 4, 1024, 64, 1.0, torch.bfloat16)):
    q, k, v = ((amp * torch.randn(B, N, T, H, device="cuda")).to(dt) for _ in range(3))
    row = []
    for rep in ("mufu", "fma"):
        for bn in (16, 32, 64):
            bs = BlockSizes(128, bn, 8, 3, replica=rep)
            got = launch.forward(q, k, v, scale=H ** -0.5, is_causal=False, checks_on=True, blocks=bs)
            r = (got.stats[2] / got.stats[3]).max()
            row.append(f"{rep}/{bn}: {float(r):.3f}")
    print(f"[B={B} N={N} T={T} H={H} x{amp} {str(dt)[6:]}] dmr worst ratio " + ", ".join(row), flush=True)

@triton.jit
def k2(Z, P1, P2, c, COLS: tl.constexpr):
    r = tl.program_id(0)
    cols = tl.arange(0, COLS)
    z = tl.load(Z + r * COLS + cols)
    m = tl.max(z, 0)
    p1 = tl.math.exp2((z - m) * c)
    p2 = tl.math.exp2(tl.minimum(z * c - m * c, 0.0))
    tl.store(P1 + r * COLS + cols, p1); tl.store(P2 + r * COLS + cols, p2)
u = 2.0 ** -24
for H, std in ((64, 1.0), (64, 16.0), (64, 64.0), (128, 256.0)):
    c = float(np.float32(1.4427 / H ** .5))
    z = torch.randn(4096, 256, device="cuda") * std * H ** .5
    p1, p2 = torch.empty_like(z), torch.empty_like(z)
    k2[(4096,)](z, p1, p2, c, COLS=256)
    zd = z.double().cpu().numpy(); m = zd.max(1, keepdims=True); x = (zd - m) * c; ex = np.exp2(x)
    live = ex > 2.0 ** -100
    mu = np.broadcast_to(np.abs(m * c), x.shape)[live]
    e1, e2 = (np.abs(p.double().cpu().numpy() - ex)[live] / ex[live] / u for p in (p1, p2))
    e12 = np.abs(p1.double().cpu().numpy() - p2.double().cpu().numpy())[live] / ex[live] / u
    model = 2 * 16 + np.log(2) * (mu + 3 * np.abs(x[live]))
    print(f"[mufu pair, H={H} logit std {std} mu max {mu.max():.0f}] |p1-p2|/p max {e12.max():.1f}u, over model {np.max(e12/model):.3f}; "
          f"p1 err max {e1.max():.1f}u, p2 err max {e2.max():.1f}u", flush=True)
