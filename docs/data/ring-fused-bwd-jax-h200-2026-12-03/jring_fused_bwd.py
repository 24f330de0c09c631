"""JAX ring attention's fused backward on one H200 (P=1: one device holds the whole sequence):
forward+backward time and compiled temp memory of the ring (scheme "full") with the fused
backward (now the default after fused blocks) and with the unfused one (before), beside cuDNN and
the one-device default; the nine backward fault sites; clean runs over shapes and input scales.
    PYTHONPATH=. python3 docs/data/ring-fused-bwd-jax-h200-2026-12-03/jring_fused_bwd.py"""
import os, sys, time, warnings
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
warnings.filterwarnings("ignore")
sys.path.insert(0, "tests")
import numpy as np
import jax, jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as PS
import ftattn_jax
from ftattn_jax import sharding, counters, ring_fused_backward
from ftattn_spec import ring as spec_ring
from ftattn_spec.ring import RingFault
T0 = time.time()
def say(*a): print(f"[{time.time()-T0:4.0f}s]", *a, flush=True)
say("jax", jax.__version__, jax.devices()[0].device_kind)
mesh = Mesh(np.array(jax.devices()[:1]), ("seq",))
FUSED = spec_ring.FUSED_BACKWARD
def med(f, *a, n=7):
    jax.block_until_ready(f(*a)); jax.block_until_ready(f(*a))
    ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3
def temp(f, *a):
    try:
        return f.lower(*a).compile().memory_analysis().temp_size_in_bytes / 2**30
    except Exception as e:
        return float("nan")
SHAPES = ((1, 16, 8, 4096, 128, "bfloat16", False), (1, 16, 8, 8192, 128, "bfloat16", False),
          (1, 16, 8, 8192, 128, "bfloat16", True), (2, 32, 32, 4096, 64, "float16", False))
if "perf" in sys.argv[1:]:
  for B, N, K, T, H, dt, causal in SHAPES:
    ks = jax.random.split(jax.random.PRNGKey(T), 4)
    q = jax.random.normal(ks[0], (B, T, N, H), dt); k, v = (jax.random.normal(x, (B, T, K, H), dt) for x in ks[1:3])
    w = jax.random.normal(ks[3], (B, T, N, H), jnp.float32)
    grad = lambda att: jax.jit(jax.grad(lambda q, k, v: jnp.sum(att(q, k, v).astype(jnp.float32) * w), argnums=(0, 1, 2)))
    ring = lambda q, k, v: sharding.ring_attention(q, k, v, mesh=mesh, axis_name="seq", is_causal=causal, site="bench")[0]
    row = {}
    for name, fb in (("fused", FUSED), ("unfused", ("triton",))):
        spec_ring.FUSED_BACKWARD = fb; sharding._ring.cache_clear()
        g = grad(ring)
        row[name] = (med(g, q, k, v), temp(g, q, k, v))
    spec_ring.FUSED_BACKWARD = FUSED; sharding._ring.cache_clear()
    cf = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    cb = grad(cf)
    one = grad(lambda q, k, v: ftattn_jax.attention(q, k, v, is_causal=causal)[0])
    c, o = med(cb, q, k, v), med(one, q, k, v)
    (fz, fm), (uf, um) = row["fused"], row["unfused"]
    say(f"B{B} N{N} K{K} T{T} H{H} {dt} causal={causal:d}: fwd+bwd ms cudnn {c:.2f} | ring fused-bwd {fz:.2f} "
        f"({c/fz:.2f}x, temp {fm:.2f} GiB) | ring unfused-bwd {uf:.2f} ({c/uf:.2f}x, temp {um:.2f} GiB) | "
        f"one-device default {o:.2f} ({c/o:.2f}x) | fused/unfused speedup {uf/fz:.2f}x")
  say("counters", {s: (t.calls, t.detected) for s, t in counters.tally().items()})

checks = ("qk_row", "softmax_dmr", "pv_row")
def ratios_fn(causal, H):
    static = sharding._Static("seq", 1, checks, H ** -0.5, causal, "pallas")
    def per_device(qc, kc, vc, wc, rp):
        (o, *_), lse = sharding._forward(qc, kc, vc, None, static)
        _, (ratios, steps) = ring_fused_backward.backward(qc, kc, vc, o, lse, wc, scale=static.scale, is_causal=causal,
                                                          axis_name="seq", axis_size=1, checks=checks, plan=rp)
        return {n: jnp.nanmax(jnp.where(jnp.isnan(x), jnp.inf, x))[None] for n, x in ratios.items()}
    seq = PS(None, "seq")
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(seq, seq, seq, seq, PS()), out_specs=PS("seq"), check_vma=False))

if "faults" in sys.argv[1:]:
    B, N, K, T, H, dt = 1, 16, 8, 4096, 128, "bfloat16"
    ks = jax.random.split(jax.random.PRNGKey(5), 4)
    q = jax.random.normal(ks[0], (B, T, N, H), dt); k, v = (jax.random.normal(x, (B, T, K, H), dt) for x in ks[1:3])
    w = jax.random.normal(ks[3], (B, T, N, H), dt)
    fn = ratios_fn(False, H)
    for f in (RingFault("bwd_scores", (0, 3, 1000, 2000), value=40.0), RingFault("bwd_probs", (0, 4, 77, 3001), value=0.9),
              RingFault("bwd_dp", (0, 9, 3000, 17), value=-30.0), RingFault("bwd_ds", (0, 5, 2, 8), value=3.0),
              RingFault("bwd_dq", (0, 3, 1000, 5), step=0, value=7.0), RingFault("bwd_dk", (0, 1, 2049, 4), step=0, value=-9.0),
              RingFault("bwd_dv", (0, 2, 17, 100), step=0, bit=28), RingFault("bwd_dk_acc", (0, 0, 2, 5), step=0, value=11.0),
              RingFault("bwd_dv_acc", (0, 7, 4000, 70), step=0, bit=29)):
        rp = jax.tree.map(jnp.asarray, spec_ring.plan(f, dict(B=B, T=T, S=T, N=N, K=K, H=H), 1, dt, checks, implementation="pallas", backward=None))
        r = {n: float(x[0]) for n, x in fn(q, k, v, w, rp).items()}
        say(f"fault {f.site}: flagged {[n for n, x in r.items() if not x <= 1.0]}; worst ratio {max(r.values()):.3g}")
    say("compilations", fn._cache_size())

if "clean" in sys.argv[1:]:
    worst_all = 0.0
    for (B, N, K, T, H, dt, causal) in ((1, 16, 8, 4096, 128, "bfloat16", False), (1, 8, 8, 777, 64, "float16", True),
                                        (2, 4, 2, 2048, 32, "bfloat16", True), (1, 16, 16, 8192, 128, "float16", False),
                                        (1, 4, 1, 1000, 64, "bfloat16", False)):
        fn = ratios_fn(causal, H)
        for scale in (0.25, 1.0, 4.0, 8.0):
            ks = jax.random.split(jax.random.PRNGKey(T + int(scale * 8)), 4)
            q = (jax.random.normal(ks[0], (B, T, N, H)) * scale).astype(dt)
            k, v = ((jax.random.normal(x, (B, T, K, H)) * scale).astype(dt) for x in ks[1:3])
            w = jax.random.normal(ks[3], (B, T, N, H), dt)
            r = {n: float(x[0]) for n, x in fn(q, k, v, w, None).items()}
            top = max(r, key=r.get)
            worst_all = max(worst_all, r[top])
            say(f"clean B{B} N{N} K{K} T{T} H{H} {dt} causal={causal:d} x{scale}: worst {r[top]:.3f} ({top}); flagged {[n for n, x in r.items() if not x <= 1.0]}")
    say("clean worst overall", round(worst_all, 3))
