import os, time

import torch, numpy as np
import ftattn_torch as ft
from ftattn_spec import reference, Fault
torch.manual_seed(0)
for dt in (torch.float16, torch.bfloat16):
  for causal in (False, True):
    B,N,K,T,S,H = 2,4,2,300,451,64
    q=torch.randn(B,N,T,H).to(dt).cuda(); k=torch.randn(B,K,S,H).to(dt).cuda(); v=torch.randn(B,K,S,H).to(dt).cuda()
    t=time.time()
    o,r = ft.attention(q,k,v,is_causal=causal,implementation="triton")
    t1=time.time()-t
    o2,r2 = ft.attention(q,k,v,is_causal=causal)
    err=(o.float()-o2.float()).abs().max().item()
    print(dt, causal, f"{t1:.2f}s", "err vs unfused", err, "detected", bool(r.detected))
    for n,c in r.checks.items():
        print("  ", n, "max res/thr", (c.residual/c.threshold).max().item(), "thr", c.threshold.mean().item(), "unfused thr", r2.checks[n].threshold.mean().item(), "res", c.residual.mean().item(), r2.checks[n].residual.mean().item())
    for f in [Fault("scores",(1,3,205,7),bit=30), Fault("probs",(0,1,130,2),bit=29), Fault("probs",(0,1,130,2),bit=29, replica=1), Fault("out",(1,2,136,3),bit=27)]:
        o3,r3 = ft.attention(q,k,v,is_causal=causal,implementation="triton", fault=f)
        print("  ", f.site, f.replica, {n:int(c.flagged.sum()) for n,c in r3.checks.items()})
        o4,r4 = ft.attention(q,k,v,is_causal=causal,implementation="triton", fault=f, on_fault="correct")
        print("     corrected", int(r4.corrected), (o4.float()-o.float()).abs().max().item())
