import sys
import numpy as np, torch, ftattn_torch
from ftattn_spec import Fault
B, T, N, K, S, H = 2, 200, 4, 2, 300, 64
rng = np.random.default_rng(3)
Q, KK, V = (rng.standard_normal(s).astype(np.float16) for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous().cuda() for x in (Q, KK, V))
name = sys.argv[1]
cases = {"two same elem b30,b12": [Fault("probs", (1, 0, 77, 200), bit=30), Fault("probs", (1, 0, 77, 200), bit=12)],
         "two far b30": [Fault("probs", (1, 0, 77, 200), bit=30), Fault("probs", (0, 3, 5, 6), bit=30)],
         "two same elem b12,b3": [Fault("probs", (1, 0, 77, 200), bit=12), Fault("probs", (1, 0, 77, 200), bit=3)]}
faults = cases[name]
_, r = ftattn_torch.attention(tq, tk, tv, fault=faults, implementation="triton")
torch.cuda.synchronize()
print(name, {k: int(x.flagged.sum()) for k, x in r.checks.items()}, flush=True)
