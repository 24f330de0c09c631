"""softmax_dmr's two exponentials, element by element, on the H200: the primary exp2((z − m)·c) (MUFU) and
the replica _exp2_fma(min(z·c − m·c, 0)) against float64 2^((z − m)·c), by logit magnitude: which of the
two departs from the tolerance model's per-element bound 2·c_exp·u + ln2·u·(μ + 3|x|)?
    PYTHONPATH=. python3 docs/data/dmr-large-logits-h200-2026-12-03/dmr_elem.py"""
import numpy as np, torch, triton, triton.language as tl
from ftattn_torch.fused.triton_kernel import _exp2_fma

@triton.jit
def k(Z, P1, P2, X1, X2, c, COLS: tl.constexpr):
    r = tl.program_id(0)
    cols = tl.arange(0, COLS)
    z = tl.load(Z + r * COLS + cols)
    m = tl.max(z, 0)
    m_sc = m * c
    x1 = (z - m) * c
    p1 = tl.math.exp2(x1)
    x2 = tl.minimum(z * c - m_sc, 0.0)
    p2 = _exp2_fma(x2)
    tl.store(P1 + r * COLS + cols, p1); tl.store(P2 + r * COLS + cols, p2)
    tl.store(X1 + r * COLS + cols, x1); tl.store(X2 + r * COLS + cols, x2)

u = 2.0 ** -24
torch.manual_seed(0)
ROWS, COLS = 4096, 256
for H, std, c in ((64, 1.0, 1.4427 / 8), (64, 16.0, 1.4427 / 8), (64, 64.0, 1.4427 / 8), (32, 64.0, 1.4427 / 32 ** .5), (128, 256.0, 1.4427 / 128 ** .5)):
    z = (torch.randn(ROWS, COLS, device="cuda") * std * H ** .5)  # raw q·k of std `std` after scaling
    out = [torch.empty_like(z) for _ in range(4)]
    c32 = float(np.float32(c))
    k[(ROWS,)](z, *out, c32, COLS=COLS)
    zd = z.double().cpu().numpy(); m = zd.max(1, keepdims=True)
    x = (zd - m) * c32; exact = np.exp2(x)
    p1, p2, x1, x2 = (o.double().cpu().numpy() for o in out)
    mu = np.abs(m * c32)
    live = exact > 2.0 ** -100
    e1 = np.abs(p1 - exact)[live] / exact[live] / u
    e2 = np.abs(p2 - exact)[live] / exact[live] / u
    e12 = np.abs(p1 - p2)[live] / exact[live] / u
    model = (2 * 16 + np.log(2) * (np.broadcast_to(mu, x.shape)[live] + 3 * np.abs(x[live])))
    a1 = np.abs(x1 - x)[live] / u; a2 = np.abs(x2 - x)[live] / u
    print(f"[H={H} logit std {std} mu max {mu.max():.0f}] |p1-p2|/p in u: max {e12.max():.1f}, max over model {np.max(e12 / model):.3f}; "
          f"primary err max {e1.max():.1f}u, replica err max {e2.max():.1f}u; argument err (u): primary max {a1.max():.1f} "
          f"(vs |x| max {np.abs(x[live]).max():.0f}), replica max {a2.max():.1f}; primary err/|x| max {np.max(e1/(1+np.abs(x[live]))):.2f}", flush=True)
