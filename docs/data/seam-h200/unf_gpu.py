import sys, numpy as np
res = {}
import torch, ftattn_torch, jax, jax.numpy as jnp, ftattn_jax
from ftattn_spec import Fault
g = torch.Generator().manual_seed(5)
q = torch.randn(3, 4, 40, 16, generator=g).cuda(); k = torch.randn(3, 2, 50, 16, generator=g).cuda(); v = torch.randn(3, 2, 50, 16, generator=g).cuda()
for name, kw in [("lens", dict(key_value_seq_lengths=torch.tensor([50, 20, 33]).cuda(), local_window_size=(9, 4))), ("plain", {}), ("causal", dict(is_causal=True))]:
    for fault in (None, Fault("out", (2, 1, 7, 5), bit=28), Fault("scores", (1, 3, 9, 8), bit=29)):
        o, r = ftattn_torch.attention(q, k, v, fault=fault, on_fault="correct", **kw)
        tag = f"t/{name}/{fault}"
        res[tag + "/out"] = o.cpu().numpy()
        for c, x in r.checks.items():
            res[f"{tag}/{c}/res"] = x.residual.cpu().numpy(); res[f"{tag}/{c}/thr"] = x.threshold.cpu().numpy()
        qj, kj, vj = (jnp.asarray(x.cpu().numpy().transpose(0, 2, 1, 3)) for x in (q, k, v))
        kwj = {kk: (jnp.asarray(vv.cpu().numpy()) if hasattr(vv, "numpy") else vv) for kk, vv in kw.items()}
        o, r = ftattn_jax.attention(qj, kj, vj, fault=fault, on_fault="correct", **kwj)
        tag = f"j/{name}/{fault}"
        res[tag + "/out"] = np.asarray(o)
        for c, x in r.checks.items():
            res[f"{tag}/{c}/res"] = np.asarray(x.residual); res[f"{tag}/{c}/thr"] = np.asarray(x.threshold)
np.savez(sys.argv[1], **res)
