"""Cost of ftattn_jax.common.as_stored (the optimization barrier at the JAX entry and in the fused backward)
on the default path: ftattn_jax.attention under jit, forward and forward+backward, with the barrier and with it
replaced by the identity, beside cuDNN, in one process.
    PYTHONPATH=. python3 docs/data/barrier-h200-2026-12-03/barrier_bench.py"""
import os, warnings
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
warnings.filterwarnings("ignore")
import jax, jax.numpy as jnp
import ftattn_jax
from ftattn_jax import api
from ftattn_jax.fused import runner
from compare.timing import pipelined
print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
real = api.as_stored
ident = lambda *xs: xs
def setb(on):
    api.as_stored = real if on else ident
    runner.as_stored = real if on else ident
def sync(x): jax.block_until_ready(x)
rows = []
for (B, T, N, H, dt, causal) in [(2, 4096, 16, 128, jnp.bfloat16, False), (2, 8192, 16, 128, jnp.bfloat16, True),
                                  (4, 4096, 32, 64, jnp.float16, False)]:
    ks = jax.random.split(jax.random.key(T + H), 8)
    ins = [tuple(jax.random.normal(ks[i * 4 + j], (B, T, N, H), dt) for j in range(4)) for i in range(2)]
    mask = "causal" if causal else None
    res = {}
    for name in ["barrier", "identity", "cudnn"]:
        if name == "cudnn":
            att = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
        else:
            setb(name == "barrier")
            att = lambda q, k, v: ftattn_jax.attention(q, k, v, is_causal=causal)[0]
        fwd = jax.jit(lambda q, k, v, g: att(q, k, v))
        loss = lambda q, k, v, g: jnp.sum(att(q, k, v).astype(jnp.float32) * g.astype(jnp.float32))
        fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        res[name] = (pipelined(fwd, ins, sync)["ms"], pipelined(fb, ins, sync)["ms"])
    setb(True)
    print(f"[{B=} {T=} {N=} {H=} {jnp.dtype(dt).name} causal={causal}] " + " | ".join(
        f"{n}: fwd {f:.3f} ms, fwd+bwd {b:.3f} ms" for n, (f, b) in res.items())
        + f" | barrier/identity fwd {res['barrier'][0]/res['identity'][0]:.3f} fwd+bwd {res['barrier'][1]/res['identity'][1]:.3f}"
        + f" | cudnn/barrier fwd {res['cudnn'][0]/res['barrier'][0]:.3f} fwd+bwd {res['cudnn'][1]/res['barrier'][1]:.3f}", flush=True)
