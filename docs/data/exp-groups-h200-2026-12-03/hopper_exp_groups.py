"""softmax_exp in the Hopper kernel with products of raw probabilities (MosaicBlocks.exp_logs "pairs", "quads")
beside "each" (the default): clean ratio, faults at P, timing against checks off, the DMR and full.
    PYTHONPATH=. python3 docs/data/exp-groups-h200-2026-12-03/hopper_exp_groups.py"""
import os, time, sys
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax, jax.numpy as jnp, numpy as np
from ftattn_jax import fused
from ftattn_spec.faults import Fault, plan
from compare import timing
T0 = time.time()
MODE = ["each"]
FORMS = ("each", "pairs", "quads")
def say(*a): print(f"[{time.time()-T0:4.0f}s]", *a, flush=True)
def run(q, k, v, checks, causal, pl=None):
    return fused.run(q, k, v, checks=checks, granularity="vector", scale=q.shape[-1] ** -0.5, is_causal=causal,
                     lowering="mosaic_gpu", plan=pl, blocks=fused.MosaicBlocks(exp_logs=MODE[0]))
def qkv(seed, B, T, N, S, H, dtype, scale=1.0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (B, T, N, H), dtype) * scale, jax.random.normal(ks[1], (B, S, N, H), dtype) * scale,
            jax.random.normal(ks[2], (B, S, N, H), dtype))
say(jax.__version__, jax.devices()[0].device_kind)
for mode in FORMS:
    MODE[0] = mode
    for causal in (False, True):
        for dtype, scale, H in (("bfloat16", 4.0, 128), ("float16", 1.0, 64)):
            q, k, v = qkv(3, 2, 300, 4, 520, H, dtype, scale)
            ref = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), is_causal=causal)
            o, r = run(q, k, v, ("qk_row", "softmax_exp", "pv_row"), causal)
            err = float(jnp.max(jnp.abs(o.astype(jnp.float32) - ref)))
            clean = {n: float(jnp.max(c.residual / c.threshold)) if n != "softmax_exp" else float(jnp.max(c.residual))
                     for n, c in r.checks.items()}
            flags = []
            for bit in (30, 25, 22, 20):
                _, rf = run(q, k, v, ("softmax_exp",), causal, pl=plan([Fault("probs", (1, 2, 250, 40), bit=bit)]))
                fl = np.asarray(rf.checks["softmax_exp"].flagged)
                flags.append(f"bit{bit}:{int(fl[1,2,250])}/{int(fl.sum())}")
            say(f"{mode} {dtype} x{scale} H{H} causal={causal:d}: detected={bool(r.detected)} err {err:.3g}; clean "
                + " ".join(f"{n} {x:.3g}" for n, x in clean.items()) + f"; fault at P (row/rows) {' '.join(flags)}")
for dtype, causal, B, N, T, H in (("float16", False, 2, 32, 8192, 128), ("bfloat16", True, 2, 32, 8192, 128),
                                  ("bfloat16", False, 4, 32, 8192, 64)):
    ins = [qkv(1, B, T, N, T, H, dtype), qkv(2, B, T, N, T, H, dtype)]
    res = {}
    cases = [("off", (), "each"), ("dmr", ("softmax_dmr",), "each"),
             *((f"exp {m}", ("softmax_exp",), m) for m in FORMS),
             *((f"abft_all {m}", ("qk_row", "softmax_exp", "pv_row"), m) for m in FORMS),
             ("full", ("qk_row", "softmax_dmr", "pv_row"), "each")]
    for name, checks, mode in cases:
        MODE[0] = mode
        f = jax.jit(lambda q, k, v, c=checks: run(q, k, v, c, causal))
        jax.block_until_ready(f(*ins[0]))
        res[name] = timing.pipelined(f, ins, jax.block_until_ready)["ms"]
    ref = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn"))
    jax.block_until_ready(ref(*ins[0]))
    cud = timing.pipelined(ref, ins, jax.block_until_ready)["ms"]
    say(f"{dtype} causal={causal:d} B{B} N{N} T{T} H{H}: cudnn {cud:.3f}; " + "; ".join(
        f"{n} {ms:.3f} ({ms/res['off']-1:+.0%}, {cud/ms:.2f}x)" for n, ms in res.items()))
