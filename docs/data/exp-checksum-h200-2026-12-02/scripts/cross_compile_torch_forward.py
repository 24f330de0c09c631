"""Compile the Triton forward kernel, with softmax_exp and fault injection, for sm_90 on a machine
without a GPU (triton 3.6): PYTHONPATH=. python docs/data/exp-checksum-h200-2026-12-02/scripts/cross_compile_torch_forward.py"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ftattn_torch.fused import triton_kernel as tk
PTR_F16 = {"Q", "K", "V", "O", "VCOL"}
PTR_F32 = {"LSE", "KSUM", "STATS", "FV", "BIAS"}
def sig(fn, const):
    s = {}
    for name in fn.arg_names:
        if name in const: s[name] = "constexpr"; continue
        if name in PTR_F16: s[name] = "*fp16"
        elif name in PTR_F32: s[name] = "*fp32"
        elif name in ("FLAGS", "MASK"): s[name] = "*i8"
        elif name in ("COUNT", "FT", "REDO"): s[name] = "*i32"
        elif name in ("QLEN", "KLEN"): s[name] = "*i64"
        elif name in ("scale",) or name.startswith(("coef", "allow", "dmr_", "ex_", "ra_", "vcol")): s[name] = "fp32"
        else: s[name] = "i32"
    return s
for H in (64, 128):
    for inject, masked in ((False, False), (True, False), (True, True)):
        const = dict(H=H, BLOCK_M=128, BLOCK_N=64, CHUNK=64, HAS_MASK=masked, HAS_BIAS=masked, HAS_QLEN=masked,
                     HAS_KLEN=masked, QK=True, DMR=False, PV=True, INJECT=inject, REDO_MODE=False, UPCAST=False,
                     SIGNED=False, REPLICA_FMA=False, STORE_LSE=True, EXPC=True)
        try:
            ck = triton.compile(ASTSource(fn=tk._forward, signature=sig(tk._forward, const), constexprs=const),
                                target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, num_stages=2))
            print(f"H={H} inject={inject} masks={masked}: compiled, shared {ck.metadata.shared} bytes")
        except Exception as e:
            print(f"H={H} inject={inject} masks={masked}: FAILED {type(e).__name__}: {str(e)[:600]}")
