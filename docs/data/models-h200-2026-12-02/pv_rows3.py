import numpy as np, torch, ftattn_torch
from ftattn_spec import Fault, fault_models as fm
B, T, N, K, S, H = 2, 200, 4, 2, 300, 64
rng = np.random.default_rng(3)
Q, KK, V = (rng.standard_normal(s).astype(np.float16) for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous().cuda() for x in (Q, KK, V))
clean, _ = ftattn_torch.attention(tq, tk, tv, implementation="triton")
for name, faults in (("one b30", [Fault("probs", (1, 0, 77, 200), bit=30)]),
                     ("two same elem b30,b12", [Fault("probs", (1, 0, 77, 200), bit=30), Fault("probs", (1, 0, 77, 200), bit=12)]),
                     ("two far b30", [Fault("probs", (1, 0, 77, 200), bit=30), Fault("probs", (0, 3, 5, 6), bit=30)]),
                     ("two same elem b12,b3", [Fault("probs", (1, 0, 77, 200), bit=12), Fault("probs", (1, 0, 77, 200), bit=3)]),
                     ("multi 30,12,3", fm.multi_bit("probs", (1, 0, 77, 200), (30, 12, 3))),
                     ("O two", [Fault("out", (1, 0, 77, 20), bit=30), Fault("out", (0, 2, 7, 3), bit=29)]),
                     ("S+P+O", [Fault("scores", (1, 0, 77, 20), bit=30), Fault("probs", (0, 1, 9, 9), bit=30), Fault("out", (0, 2, 7, 3), bit=29)])):
    o, r = ftattn_torch.attention(tq, tk, tv, fault=faults, implementation="triton")
    _, ru = ftattn_torch.attention(tq, tk, tv, fault=faults, implementation="unfused")
    torch.cuda.synchronize()
    rows_changed = int((~(o == clean).all(-1)).sum())
    print(name, {k: (int(x.flagged.sum()), int(ru.checks[k].flagged.sum())) for k, x in r.checks.items()}, "rows changed", rows_changed, flush=True)
