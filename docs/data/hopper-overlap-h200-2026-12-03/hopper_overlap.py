"""FlashAttention-3's intra-warpgroup overlap in the Hopper kernel (MosaicBlocks(overlap=True)):
bit-identity with the default order, faults, and timing against checks off, abft_all and full.
    PYTHONPATH=. python3 docs/data/hopper-overlap-h200-2026-12-03/hopper_overlap.py"""
import os, time, sys
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax, jax.numpy as jnp, numpy as np
from ftattn_jax import fused
from ftattn_spec.faults import Fault, plan
from compare import timing
T0 = time.time()
FULL, ABFT = ("qk_row", "softmax_dmr", "pv_row"), ("qk_row", "softmax_exp", "pv_row")
def say(*a): print(f"[{time.time()-T0:4.0f}s]", *a, flush=True)
def run(q, k, v, checks, causal, ov, pl=None):
    return fused.run(q, k, v, checks=checks, granularity="vector", scale=q.shape[-1] ** -0.5, is_causal=causal,
                     lowering="mosaic_gpu", plan=pl, blocks=fused.MosaicBlocks(overlap=ov))
def qkv(seed, B, T, N, S, H, dtype, scale=1.0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (B, T, N, H), dtype) * scale, jax.random.normal(ks[1], (B, S, N, H), dtype) * scale,
            jax.random.normal(ks[2], (B, S, N, H), dtype))
say(jax.__version__, jax.devices()[0].device_kind)
if "--skip-check" not in sys.argv:
    for dtype, scale, H, causal, T, S in (("bfloat16", 4.0, 128, False, 300, 520), ("bfloat16", 4.0, 128, True, 300, 520),
                                          ("float16", 1.0, 64, False, 300, 520), ("float16", 1.0, 64, True, 520, 300),
                                          ("float16", 1.0, 128, False, 200, 100), ("bfloat16", 1.0, 128, True, 1000, 1000)):
        q, k, v = qkv(3, 2, T, 4, S, H, dtype, scale)
        ref = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), is_causal=causal)
        line = []
        for name, checks in (("off", ()), ("full", FULL), ("abft_all", ABFT)):
            a, ra = run(q, k, v, checks, causal, False)
            b, rb = run(q, k, v, checks, causal, True)
            same = bool(jnp.all(a == b))
            err = float(jnp.max(jnp.abs(b.astype(jnp.float32) - ref)))
            res = max([float(jnp.max(jnp.abs(ra.checks[n].residual - rb.checks[n].residual) / ra.checks[n].threshold))
                       for n in ra.checks] or [0.0])
            line.append(f"{name}: bit-same={same} err {err:.3g} det {bool(ra.detected)}/{bool(rb.detected)} dres {res:.2g}")
        fl = []
        for checks, bit in ((FULL, 29), (ABFT, 25)):
            _, rf = run(q, k, v, checks, causal, True, pl=plan([Fault("probs", (1, 2, 150, 40), bit=bit)]))
            n = "softmax_dmr" if checks is FULL else "softmax_exp"
            f = np.asarray(rf.checks[n].flagged)
            fl.append(f"{n} row {int(f[1,2,150])} of {int(f.sum())}")
        say(f"{dtype} x{scale} H{H} causal={causal:d} T{T} S{S}: " + "; ".join(line) + "; faults: " + ", ".join(fl))
for dtype, causal, B, N, T, H in (("float16", False, 2, 32, 8192, 128), ("bfloat16", True, 2, 32, 8192, 128),
                                  ("bfloat16", False, 4, 32, 8192, 64), ("float16", False, 2, 32, 4096, 128)):
    ins = [qkv(1, B, T, N, T, H, dtype), qkv(2, B, T, N, T, H, dtype)]
    res = {}
    for name, checks in (("off", ()), ("abft_all", ABFT), ("full", FULL)):
        for ov in (False, True):
            f = jax.jit(lambda q, k, v, c=checks, o=ov: run(q, k, v, c, causal, o))
            jax.block_until_ready(f(*ins[0]))
            res[(name, ov)] = timing.pipelined(f, ins, jax.block_until_ready)["ms"]
    ref = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn"))
    jax.block_until_ready(ref(*ins[0]))
    cud = timing.pipelined(ref, ins, jax.block_until_ready)["ms"]
    off = {ov: res[("off", ov)] for ov in (False, True)}
    say(f"{dtype} causal={causal:d} B{B} N{N} T{T} H{H}: cudnn {cud:.3f}; " + "; ".join(
        f"{n}{' ov' if ov else ''} {ms:.3f} ({ms/off[ov]-1:+.0%} over its off, {ms/res[(n, False)]-1:+.1%} vs no-ov, {cud/ms:.2f}x)"
        for (n, ov), ms in res.items()))
