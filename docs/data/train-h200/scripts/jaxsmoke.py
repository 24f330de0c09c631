"""JAX pallas backward on the GPU: compile, run, compare with float32 jax.nn, counters, one fault."""
import time, numpy as np, jax, jax.numpy as jnp
import ftattn_jax
from ftattn_jax import counters
from ftattn_spec.faults import Fault
print("jax", jax.__version__, jax.devices(), flush=True)
for (B, N, K, T, S, H, causal, dt) in [(2, 8, 2, 1000, 1000, 128, True, "bfloat16"), (2, 8, 8, 777, 1030, 64, False, "float16"),
                                       (1, 4, 4, 4096, 4096, 128, True, "bfloat16")]:
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), dt); k = jnp.asarray(rng.standard_normal((B, S, K, H)), dt)
    v = jnp.asarray(rng.standard_normal((B, S, K, H)), dt); g = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    def lossf(f):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * g), argnums=(0, 1, 2)))
    ref = lossf(lambda q, k, v: jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), is_causal=causal))
    for scheme in ("baseline", "full"):
        f = lossf(lambda q, k, v: ftattn_jax.dot_product_attention(q, k, v, is_causal=causal, scheme=scheme, implementation="pallas"))
        try:
            counters.reset(); t = time.time(); out = jax.block_until_ready(f(q, k, v)); t1 = time.time() - t
            r = ref(q, k, v)
            errs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b))) for a, b in zip(out, r)]
            print(f"{dt} B{B} N{N} K{K} T{T} S{S} H{H} causal={causal} {scheme}: compile+run {t1:.1f}s rel err dq/dk/dv "
                  + " ".join(f"{e:.2e}" for e in errs) + f" counters {counters.read()}", flush=True)
        except Exception as e:
            print(f"{scheme} FAILED {type(e).__name__}: {str(e)[:1500]}", flush=True)
    # one fault per backward site
    for site in ("bwd_scores", "bwd_probs", "bwd_dp", "bwd_ds", "bwd_dq", "bwd_dk", "bwd_dv"):
        idx = (0, 1, 5, 3) if site not in ("bwd_dk", "bwd_dv") else (0, 0, 3, 7)
        f = lossf(lambda q, k, v: ftattn_jax.attention(q, k, v, is_causal=causal, implementation="pallas", site="smoke",
                                                       fault=Fault(site, idx, bit=27))[0])
        try:
            counters.reset(); jax.block_until_ready(f(q, k, v))
            print(f"  fault {site}: {counters.read().get('smoke (backward)')}", flush=True)
        except Exception as e:
            print(f"  fault {site} FAILED {type(e).__name__}: {str(e)[:600]}", flush=True)
