"""Tensor descriptors (TMA) for K, V and the pv_row columns in the Triton forward
(BlockSizes(tma=True)) against pointer loads; checks off, abft_all and full, in one process, SDPA
cuDNN beside. Run on the H200 (2026-12-03):
    PYTHONPATH=. python3 docs/data/triton-tma-h200-2026-12-03/triton_tma.py"""
import dataclasses, time
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from ftattn_torch import fused
from ftattn_torch.fused import launch
from ftattn_spec.faults import Fault, plan
from compare import timing
T0 = time.time()
def say(*a): print(f"[{time.time()-T0:4.0f}s]", *a, flush=True)
say(torch.__version__, torch.cuda.get_device_name())
timer = timing.CudaEventTimer(torch)
def qkv(seed, B, N, T, H, dtype, K=None):
    g = torch.Generator(device="cuda").manual_seed(seed)
    sh = lambda n: (B, n, T, H)
    return tuple(torch.randn(sh(n), device="cuda", dtype=dtype, generator=g) for n in (N, K or N, K or N))
ABFT = ("qk_row", "softmax_exp", "pv_row")
FULL = ("qk_row", "softmax_dmr", "pv_row")
def call(which, causal, tma, pl=None, **over):
    on = bool(which)
    bs = dataclasses.replace(fused.BlockSizes.get_default(False, checks=on, T=None), tma=tma, **over)
    def f(q, k, v):
        return launch.forward(q, k, v, scale=q.shape[-1] ** -0.5, is_causal=causal, checks_on=on, which=which or None,
                              blocks=bs, plan=pl)
    return f
# correctness: pointer and descriptor reads give the same bits (T, S not multiples of the tiles, GQA)
for causal, dtype in ((False, torch.float16), (True, torch.bfloat16)):
    q, k, v = qkv(3, 2, 4, 520, 128, dtype, K=2)
    for which in ((), ABFT, FULL):
        pl = plan([Fault("probs", (1, 2, 250, 40), bit=25)]) if which else None
        a = call(which, causal, False, pl)(q, k, v)
        b = call(which, causal, True, pl)(q, k, v)
        same = all(torch.equal(x, y) for x, y in zip(a[:4], b[:4]) if x is not None)
        say(f"{dtype} causal={causal:d} {which}: pointer == descriptor: {same}; flagged "
            f"{None if b[2] is None else int(b[2].any(0).sum())}")
for dtype, causal, B, N, T, H in ((torch.float16, False, 2, 32, 4096, 128), (torch.float16, False, 2, 32, 8192, 128),
                                  (torch.bfloat16, True, 2, 32, 8192, 128), (torch.bfloat16, False, 4, 32, 8192, 64),
                                  (torch.float16, False, 1, 32, 16384, 128)):
    ins = [qkv(1, B, N, T, H, dtype), qkv(2, B, N, T, H, dtype)]
    cases = [("off", (), False, {}), ("off tma", (), True, {}),
             ("off tma s4", (), True, dict(num_stages=4)), ("off tma s2", (), True, dict(num_stages=2)),
             ("abft_all", ABFT, False, {}), ("abft_all tma", ABFT, True, {}),
             ("abft_all tma s2", ABFT, True, dict(num_stages=2)),
             ("full", FULL, False, {}), ("full tma", FULL, True, {})]
    res = {}
    for name, which, tma, over in cases:
        try:
            res[name] = timing.robust(call(which, causal, tma, **over), ins, timer)["ms"]
        except Exception as e:  # e.g. shared memory
            say(f"  {name}: {type(e).__name__}: {str(e)[:200]}")
    def sdpa(q, k, v):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    cud = timing.robust(sdpa, ins, timer)["ms"]
    say(f"{str(dtype)[6:]} causal={causal:d} B{B} N{N} T{T} H{H}: cudnn {cud:.3f}; " + "; ".join(
        f"{n} {ms:.3f} ({ms/res['off']-1:+.0%}, {cud/ms:.2f}x)" for n, ms in res.items()))
