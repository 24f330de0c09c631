import torch, time
import torch.nn.functional as F
import ftattn_torch as ft
dev="cuda"; torch.manual_seed(0)
B,N,T,H=2,16,2048,128
q,k,v=(torch.randn(B,N,T,H,device=dev,dtype=torch.float16) for _ in range(3))
lens=torch.tensor([T,T//2],device=dev)
keys=torch.arange(T,device=dev)[None,:]<lens[:,None]
causal=torch.arange(T,device=dev)[None,:]<=torch.arange(T,device=dev)[:,None]
i,j=torch.arange(T,device=dev)[:,None],torch.arange(T,device=dev)[None,:]
forms={"causal":(q,None,True),"hf-mask":(q,causal[None,None]&keys.flip(1)[:,None,None,:],False),
       "padding":(q,keys[:,None,None,:].expand(B,1,T,T),False),"window":(q,(j<=i)&(j>=i-256),False),
       "bias":(q,(0.1*torch.randn(1,N,T,T,device=dev)).half(),False),"decode":(q[:,:,-1:],keys[:,None,None,:],False)}
def tm(fn,n=10):
    for _ in range(3): fn()
    torch.cuda.synchronize(); ts=[]
    for _ in range(n):
        s=torch.cuda.Event(enable_timing=True); e=torch.cuda.Event(enable_timing=True); s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    ts.sort(); return ts[len(ts)//2]
print(f"B={B} N={N} T=S={T} H={H} float16, torch {torch.__version__}; median of 10 after 3 warm-ups (CUDA events)")
print(f"{'form':9s}{'F.sdpa ms':>10s}{'default ms':>11s}{'x sdpa':>8s}{'unfused ms':>11s}  ran      max|fused-unfused| detected")
for name,(qq,am,c) in forms.items():
    try:
        t0=tm(lambda: F.scaled_dot_product_attention(qq,k,v,am,is_causal=c))
        t1=tm(lambda: ft.scaled_dot_product_attention(qq,k,v,am,is_causal=c))
        t2=tm(lambda: ft.scaled_dot_product_attention(qq,k,v,am,is_causal=c,implementation="unfused"),n=5)
        o1,r1=ft.scaled_dot_product_attention(qq,k,v,am,is_causal=c,return_report=True)
        o2,r2=ft.scaled_dot_product_attention(qq,k,v,am,is_causal=c,implementation="unfused",return_report=True)
        print(f"{name:9s}{t0:10.3f}{t1:11.3f}{t1/t0:8.2f}{t2:11.3f}  {r1.ran.implementation:8s} {float((o1.float()-o2.float()).abs().max()):.2e} {bool(r1.detected)}/{bool(r2.detected)}", flush=True)
    except Exception as e:
        print(name, type(e).__name__, str(e)[:150], flush=True)
