"""dkdv check-cost variants: kernel times (profiler) and registers/spills. bf16 causal B2 N16 T4096 H128."""
import importlib, re, torch
import ftattn_torch as ft
from ftattn_torch.fused import launch
from torch.profiler import profile, ProfilerActivity
src = open("ftattn_torch/fused/triton_backward.py").read()
i0, i1 = src.index("def _bwd_dkdv("), src.index("def _bwd_dq(")
dkdv = src[i0:i1]
def drop(patterns):
    body = "\n".join(l for l in dkdv.split("\n") if not any(re.search(p, l) for p in patterns))
    return src[:i0] + body + src[i1:]
variants = {
    "A all": src,
    "B no mags": drop([r"dk_mag \+=", r"dv_mag \+="]),
    "C no grad preds": drop([r"dk_mag \+=", r"dv_mag \+=", r"dk_pred \+=", r"dv_pred \+="]),
    "D loads only": drop([r"dk_mag \+=", r"dv_mag \+=", r"dk_pred \+=", r"dv_pred \+=", r"s_act \+=", r"p_act \+=", r"p_tot \+=", r"ds_tot \+="]),
    "E no RS/RB": drop([r"dk_mag \+=", r"dv_mag \+=", r"dk_pred \+=", r"dv_pred \+=", r"s_act \+=", r"p_act \+=", r"p_tot \+=", r"ds_tot \+=", r"_sum \+= tl.load", r"_abs \+= tl.load", r"= tl.load\(RS"]),
}
B, N, T, H = 2, 16, 4096, 128
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(B, N, T, H, generator=g).to("cuda", torch.bfloat16).requires_grad_(True) for _ in range(3))
go = torch.randn(B, N, T, H, generator=g).to("cuda", torch.bfloat16)
class Cap:
    def __init__(s, f): s.f = f; s.k = None
    def __getitem__(s, grid):
        def run(*a, **kw):
            s.k = s.f[grid](*a, **kw); return s.k
        return run
orig_default = launch.BackwardBlocks.get_default
def measure(label, scheme, blocks=None):
    if blocks: launch.BackwardBlocks.get_default = classmethod(lambda cls, interp: cls(*blocks))
    def step():
        o = ft.attention(q, k, v, is_causal=True, implementation="triton", scheme=scheme)[0]
        torch.autograd.backward(o, go)
        for x in (q, k, v): x.grad = None
    try:
        for _ in range(3): step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5): step()
            torch.cuda.synchronize()
        ev = {e.key: getattr(e, "self_device_time_total", 0) / 5000 for e in prof.key_averages()}
        mod = launch._BACKWARD
        kk = mod._bwd_dkdv.k if isinstance(mod._bwd_dkdv, Cap) else None
        kq = mod._bwd_dq.k if isinstance(mod._bwd_dq, Cap) else None
        rr = lambda x: f"regs {x.n_regs} spills {x.n_spills}" if x is not None else ""
        print(f"{label:22s} {scheme:8s} blocks={blocks} dkdv {ev.get('_bwd_dkdv', 0):.3f} ms [{rr(kk)}]  dq {ev.get('_bwd_dq', 0):.3f} ms [{rr(kq)}]", flush=True)
    except Exception as e:
        print(label, scheme, blocks, "failed", type(e).__name__, str(e)[:200], flush=True)
    launch.BackwardBlocks.get_default = orig_default
for j, (name, text) in enumerate(variants.items()):
    modname = f"_var{j}"
    open(f"ftattn_torch/fused/{modname}.py", "w").write(text)
    mod = importlib.import_module(f"ftattn_torch.fused.{modname}")
    mod._bwd_dkdv = Cap(mod._bwd_dkdv); mod._bwd_dq = Cap(mod._bwd_dq)
    launch._BACKWARD = mod
    if j == 0:
        measure(name, "baseline")
    measure(name, "full")
    if j == 0:
        for bl in [(64, 64, 8, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2), (64, 64, 4, 3), (64, 64, 4, 1)]:
            measure(name, "baseline", bl)
            measure(name, "full", bl)
