import numpy as np, torch, ftattn_torch
from ftattn_spec import Fault, fault_models as fm
B, T, N, K, S, H = 2, 200, 4, 2, 300, 64
rng = np.random.default_rng(3)
Q, KK, V = (rng.standard_normal(s).astype(np.float16) for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous().cuda() for x in (Q, KK, V))
for name, faults in (("single b30", [Fault("probs", (1, 0, 77, 200), bit=30)]), ("single b28", [Fault("probs", (1, 0, 77, 200), bit=28)]),
                     ("multi 30,12,3", fm.multi_bit("probs", (1, 0, 77, 200), (30, 12, 3))), ("two b30 far", [Fault("probs", (1, 0, 77, 200), bit=30), Fault("probs", (0, 3, 5, 6), bit=30)]),
                     ("S b30", [Fault("scores", (1, 0, 77, 200), bit=30)]), ("O b30", [Fault("out", (1, 0, 77, 20), bit=30)])):
    for impl in ("triton", "unfused"):
        _, r = ftattn_torch.attention(tq, tk, tv, fault=faults, implementation=impl)
        c = r.checks["pv_row"]
        print(name, impl, {k: int(x.flagged.sum()) for k, x in r.checks.items()}, "pv thr finite", int(torch.isfinite(c.threshold).sum()),
              "res finite", int(torch.isfinite(c.residual).sum()), flush=True)
