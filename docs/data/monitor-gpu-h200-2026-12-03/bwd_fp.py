"""Which check of the JAX fused backward flags a clean step of four stacked attention layers on the H200
(q of layer i+1 = the output of layer i): the largest ratio per check and layer."""
import os, sys, warnings
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
warnings.filterwarnings("ignore")
import jax, jax.numpy as jnp, numpy as np
import ftattn_jax
import ftattn_jax.fused.gradients as G
from ftattn_jax.fused import pallas_backward as pb
from ftattn_jax import monitor
names = list(pb.ROW_CHECKS) + list(pb.KEY_CHECKS) + ["bwd_softmax_kv"]
orig, cnt = G.verdict, {"i": 0}
def v(res, thr, *a, **kw):
    r = orig(res, thr, *a, **kw)
    i = cnt["i"]; cnt["i"] += 1
    ratio = jnp.where(thr > 0, res / thr, jnp.where(res > 0, jnp.inf, 0.0))
    flat = jnp.argmax(ratio.reshape(-1))
    jax.debug.callback(lambda m, f, at, res_, thr_, i=i: print(f"  call {i // 13} {names[i % 13]:16s} max ratio {float(m):.3g} "
                       f"flagged {int(f)} at {np.unravel_index(int(at), ratio.shape)} res {float(res_):.3g} thr {float(thr_):.3g}", flush=True),
                       jnp.max(ratio), jnp.sum(r.flagged), flat, res.reshape(-1)[flat], thr.reshape(-1)[flat])
    return r
G.verdict = v
B, N, T, H, L = 2, 16, 2048, 128, 4
ks = jax.random.split(jax.random.PRNGKey(0), 4)
base = [jax.random.normal(x, (B, T, N, H), jnp.bfloat16) for x in ks[:3]]
g = jax.random.normal(ks[3], (B, T, N, H), jnp.float32)
for lowering in ("mosaic_gpu", "triton"):
    cnt["i"] = 0
    def loss(q, k, v, g):
        out = q
        for i in range(L):
            out, _ = ftattn_jax.attention(out, k, v, site=f"layer {i}", implementation="pallas", lowering=lowering)
        return jnp.sum(out.astype(jnp.float32) * g)
    mon = monitor.Monitor()
    print("==", lowering, flush=True)
    jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*base, g))
    print(mon.step().summary(), flush=True)
