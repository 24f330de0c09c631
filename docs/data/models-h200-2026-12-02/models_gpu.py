"""Stuck-at and multi-bit faults compiled on the GPU: the Triton kernel (torch) and the portable Pallas
kernel (JAX) against the unfused path's rows, float16."""
import os
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import numpy as np, torch, jax
import ftattn_jax, ftattn_torch
from ftattn_spec import fault_models as fm
B, T, N, K, S, H = 2, 200, 4, 2, 300, 64
rng = np.random.default_rng(3)
Q, KK, V = (rng.standard_normal(s).astype(np.float16) for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous().cuda() for x in (Q, KK, V))
def rows(rep, c):
    f = rep.checks[c].flagged
    f = f.cpu().numpy() if hasattr(f, "cpu") else np.asarray(f)
    return {tuple(int(i) for i in x) for x in np.argwhere(f)}
cases = {"stuck_row P b30=1": fm.stuck_row("probs", 1, 2, 150, 30, 1), "stuck_head P b29=0": fm.stuck_head("probs", 0, 3, 29, 0),
         "stuck_row S b30=1": fm.stuck_row("scores", 1, 1, 7, 30, 1), "stuck_call O b30=1": fm.stuck_call("out", 30, 1),
         "stuck_row P b29=1 (harmless)": fm.stuck_row("probs", 0, 0, 3, 29, 1), "multi P": fm.multi_bit("probs", (1, 0, 77, 200), (30, 12, 3))}
for name, faults in cases.items():
    _, ru = ftattn_jax.attention(Q, KK, V, fault=faults, implementation="unfused")
    _, rp = ftattn_jax.attention(Q, KK, V, fault=faults, implementation="pallas")
    _, rt = ftattn_torch.attention(tq, tk, tv, fault=faults, implementation="triton")
    torch.cuda.synchronize()
    line = f"{name}: detected unfused/pallas/triton {bool(ru.detected)}/{bool(rp.detected)}/{bool(rt.detected)}"
    for c in ("qk_row", "softmax_dmr", "pv_row"):
        a, b, d = rows(ru, c), rows(rp, c), rows(rt, c)
        line += f"; {c} rows {len(a)}/{len(b)}/{len(d)} same={a == b == d}"
    print(line, flush=True)
