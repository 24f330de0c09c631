"""Is the JAX ftattn call host-synchronous because of counters.record's jax.debug.callback?"""
import os, sys, time
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax, jax.numpy as jnp, numpy as np
import ftattn_jax
from ftattn_jax import counters
from compare import timing

real = counters.record
def run(T, B=2, N=32, H=128):
    rng = np.random.default_rng(0)
    ins = [tuple(jnp.asarray(rng.uniform(-1, 1, (B, T, N, H)), jnp.float16) for _ in range(3)) for _ in range(2)]
    res = {}
    f = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
    res["jax-cudnn"] = f
    for scheme in ("baseline", "full"):
        for cb in ("on", "off"):
            counters.record = real if cb == "on" else (lambda *a, **k: None)
            g = jax.jit(lambda q, k, v, s=scheme: ftattn_jax.attention(q, k, v, scheme=s, implementation="pallas"))
            jax.block_until_ready(g(*ins[0]))  # trace and compile now, with this record
            res[f"{scheme} cb={cb}"] = g
    counters.record = real
    for name, g in res.items():
        try:
            jax.block_until_ready(g(*ins[0]))
        except Exception as e:
            print(name, "fails:", str(e)[:80]); continue
        t = timing.pipelined(g, ins, jax.block_until_ready, warmup=3, reps=10)
        print(f"T={T:5d} {name:18s} ms={t['ms']:.3f} dispatch_ms={t['dispatch_ms']:.3f}", flush=True)

print(jax.__version__, jax.devices())
if len(sys.argv) > 1:
    run(int(sys.argv[1]), 1, 2, 16)
else:
    for T in (512, 4096, 8192):
        run(T)
print(counters.read())
