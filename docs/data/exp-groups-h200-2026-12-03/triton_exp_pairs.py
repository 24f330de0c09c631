"""softmax_exp in the Triton forward with pairs of probabilities per logarithm (BlockSizes(exp_logs="pairs"))
against exponent fields and a product of mantissas ("fields"); checks off, the DMR and
full in the same process; SDPA cuDNN beside. Run on the H200 (2026-12-03):
    PYTHONPATH=. python3 docs/data/exp-groups-h200-2026-12-03/triton_exp_pairs.py"""
import dataclasses, time
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from ftattn_torch import fused
from ftattn_spec.faults import Fault, plan
from compare import timing
T0 = time.time()
def say(*a): print(f"[{time.time()-T0:4.0f}s]", *a, flush=True)
say(torch.__version__, torch.cuda.get_device_name())
timer = timing.CudaEventTimer(torch)
def qkv(seed, B, N, T, H, dtype):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn((B, N, T, H), device="cuda", dtype=dtype, generator=g) for _ in range(3))
def call(which, form, causal, pl=None):
    on = bool(which)
    bs = dataclasses.replace(fused.BlockSizes.get_default(False, checks=on, T=None), exp_logs=form)
    def f(q, k, v):
        return fused.forward(q, k, v, scale=q.shape[-1] ** -0.5, is_causal=causal, checks_on=on, which=which or None,
                             blocks=bs, plan=pl)
    return f
# correctness: clean ratio and faults at P in both forms
for form in ("fields", "pairs"):
    for causal, dtype in ((False, torch.float16), (True, torch.bfloat16)):
        q, k, v = qkv(3, 2, 4, 520, 128, dtype)
        plane = fused.STAT_PLANES["softmax_exp"]
        _, st, fl, *_ = call(("qk_row", "softmax_exp", "pv_row"), form, causal)(q, k, v)
        clean = float(st[2 * plane].max())
        res = []
        for bit in (30, 25, 22, 20):
            _, st2, fl2, *_ = call(("softmax_exp",), form, causal, plan([Fault("probs", (1, 2, 250, 40), bit=bit)]))(q, k, v)
            res.append(f"bit{bit}:{int(fl2[plane][1, 2, 250])}/{int(fl2[plane].sum())}")
        say(f"{form} {dtype} causal={causal:d}: clean softmax_exp ratio {clean:.3g} flagged {int(fl[plane].sum())}; "
            f"faults at P (row/rows) {' '.join(res)}")
for dtype, causal, B, N, T, H in ((torch.float16, False, 2, 32, 4096, 128), (torch.float16, False, 2, 32, 8192, 128),
                                  (torch.bfloat16, True, 2, 32, 8192, 128), (torch.bfloat16, False, 4, 32, 8192, 64)):
    ins = [qkv(1, B, N, T, H, dtype), qkv(2, B, N, T, H, dtype)]
    cases = [("off", (), "pairs"), ("dmr", ("softmax_dmr",), "pairs"),
             *((f"exp {m}", ("softmax_exp",), m) for m in ("fields", "pairs")),
             *((f"abft_all {m}", ("qk_row", "softmax_exp", "pv_row"), m) for m in ("fields", "pairs")),
             ("full", ("qk_row", "softmax_dmr", "pv_row"), "pairs")]
    res = {}
    for name, which, form in cases:
        res[name] = timing.robust(call(which, form, causal), ins, timer)["ms"]
    def sdpa(q, k, v):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    cud = timing.robust(sdpa, ins, timer)["ms"]
    say(f"{str(dtype)[6:]} causal={causal:d} B{B} N{N} T{T} H{H}: cudnn {cud:.3f}; " + "; ".join(
        f"{n} {ms:.3f} ({ms/res['off']-1:+.0%}, {cud/ms:.2f}x)" for n, ms in res.items()))
