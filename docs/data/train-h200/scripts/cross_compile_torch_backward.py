"""Compile the Triton backward kernels for sm_90 on a machine without a GPU (triton 3.6):
PYTHONPATH=. python docs/data/train-h200/scripts/cross_compile_torch_backward.py"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ftattn_torch.fused import triton_backward as tb
PTR_BF16 = {"Q","K","V","DO","O","DK","DV","DQ","WQ","WK"}
PTR_F32 = {"LSE","DD","STATS","BLOCKS","RB","KB","VMAX","TOTDO","DOB","VB","FV","DS","BIAS","KS","RS"}
FLOATS = {"scale","allow","sigma","mag_up","under","p_under","soft0","soft_mu"}
def sig(fn, const):
    s = {}
    for name in fn.arg_names:
        if name in const: s[name] = "constexpr"; continue
        if name in PTR_BF16: s[name] = "*bf16"
        elif name in PTR_F32: s[name] = "*fp32"
        elif name in ("FLAGS", "MASK"): s[name] = "*i8"
        elif name in ("COUNT", "FT"): s[name] = "*i32"
        elif name in ("QLEN", "KLEN"): s[name] = "*i64"
        elif name in FLOATS or name.startswith("coef"): s[name] = "fp32"
        else: s[name] = "i32"
    return s
for H in (64, 128):
    for checks in (True, False):
        for fn, extra in ((tb._bwd_dkdv, {}), (tb._bwd_dq, {"STORE_DS": False})):
            const = dict(H=H, BLOCK_M=64, BLOCK_N=64, HAS_MASK=False, HAS_BIAS=False, HAS_QLEN=False, HAS_KLEN=False,
                         CHECKS=checks, INJECT=False, UPCAST=False, **extra)
            src = ASTSource(fn=fn, signature=sig(fn, const), constexprs=const)
            try:
                ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
                print(f"H={H} checks={checks} {fn.__name__}: compiled, shared {ck.metadata.shared}, ptx {len(ck.asm['ptx'])}")
            except Exception as e:
                print(f"H={H} checks={checks} {fn.__name__}: FAILED {type(e).__name__}: {str(e)[:500]}")
for fn, const in ((tb._bwd_rows, dict(H=128, BLOCK_M=64, CHECKS=True)), (tb._bwd_keys, dict(H=128, BLOCK_N=64)),
                  (tb._bwd_dkdv, dict(H=128, BLOCK_M=64, BLOCK_N=64, HAS_MASK=True, HAS_BIAS=True, HAS_QLEN=True, HAS_KLEN=True, CHECKS=True, INJECT=True, UPCAST=False)),
                  (tb._bwd_dq, dict(H=128, BLOCK_M=64, BLOCK_N=64, HAS_MASK=True, HAS_BIAS=True, HAS_QLEN=True, HAS_KLEN=True, CHECKS=True, INJECT=True, UPCAST=False, STORE_DS=True))):
    try:
        ck = triton.compile(ASTSource(fn=fn, signature=sig(fn, const), constexprs=const), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
        print(f"{fn.__name__} all forms: compiled, shared {ck.metadata.shared}")
    except Exception as e:
        print(f"{fn.__name__}: FAILED {type(e).__name__}: {str(e)[:500]}")
