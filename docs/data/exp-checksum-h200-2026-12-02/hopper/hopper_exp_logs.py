"""softmax_exp in the Hopper kernel, the three ways of taking Σ log₂ p (MosaicBlocks.exp_logs: "each",
the default since this run; "rounded"; "fields"): clean ratio, faults at P, and timing against checks off and the DMR.
Run on the H200 (2026-12-02, later session; log in logs-run2/exp_logs.log):
    PYTHONPATH=. python3 docs/data/exp-checksum-h200-2026-12-02/hopper/hopper_exp_logs.py"""
import os, time
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax, jax.numpy as jnp, numpy as np
from ftattn_jax import fused
from ftattn_spec.faults import Fault, plan
from compare import timing
T0 = time.time()
MODE = ["each"]
def say(*a): print(f"[{time.time()-T0:4.0f}s]", *a, flush=True)
def run(q, k, v, checks, causal, pl=None):
    return fused.run(q, k, v, checks=checks, granularity="vector", scale=q.shape[-1] ** -0.5, is_causal=causal,
                     lowering="mosaic_gpu", plan=pl, blocks=fused.MosaicBlocks(exp_logs=MODE[0]))
def qkv(seed, B, T, N, S, H, dtype, scale=1.0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (B, T, N, H), dtype) * scale, jax.random.normal(ks[1], (B, S, N, H), dtype) * scale,
            jax.random.normal(ks[2], (B, S, N, H), dtype))
say(jax.__version__)
for mode in ("rounded", "fields", "each"):
    MODE[0] = mode
    for causal in (False, True):
        q, k, v = qkv(3, 2, 300, 4, 520, 128, "bfloat16", 4.0)
        _, r = run(q, k, v, ("softmax_exp",), causal)
        clean = float(jnp.max(r.checks["softmax_exp"].residual))
        flags = []
        for bit in (30, 25, 22):
            _, rf = run(q, k, v, ("softmax_exp",), causal, pl=plan([Fault("probs", (1, 2, 250, 40), bit=bit)]))
            fl = np.asarray(rf.checks["softmax_exp"].flagged)
            flags.append(f"bit{bit}:{int(fl[1,2,250])}/{int(fl.sum())}")
        say(f"{mode} causal={causal:d}: clean max ratio {clean:.3g}; fault at P (row flagged/rows flagged) {' '.join(flags)}")
for dtype, causal, B, N, T, H in (("float16", False, 2, 32, 8192, 128), ("bfloat16", False, 4, 32, 8192, 64)):
    ins = [qkv(1, B, T, N, T, H, dtype), qkv(2, B, T, N, T, H, dtype)]
    res = {}
    for name, checks, mode in (("off", (), "rounded"), ("dmr", ("softmax_dmr",), "rounded"),
                               *((f"exp {m}", ("softmax_exp",), m) for m in ("rounded", "fields", "each")),
                               *((f"abft_all {m}", ("qk_row", "softmax_exp", "pv_row"), m)
                                 for m in ("rounded", "fields", "each")),
                               ("full", ("qk_row", "softmax_dmr", "pv_row"), "rounded")):
        MODE[0] = mode
        f = jax.jit(lambda q, k, v, c=checks: run(q, k, v, c, causal))
        jax.block_until_ready(f(*ins[0]))
        res[name] = timing.pipelined(f, ins, jax.block_until_ready)["ms"]
    say(f"{dtype} causal={causal:d} B{B} N{N} T{T} H{H}: " + "; ".join(f"{n} {ms:.3f} ({ms/res['off']-1:+.0%})" for n, ms in res.items()))
