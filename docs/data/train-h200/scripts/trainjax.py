"""JAX fwd+bwd grid: jax.nn cudnn / xla vs ftattn pallas baseline/full. host timer around block_until_ready,
median of 10 after 3 warm-ups; temp memory from the compiled executable's memory analysis."""
import time, sys, numpy as np, jax, jax.numpy as jnp
import ftattn_jax as ft
def bench(f, args, n=10):
    for _ in range(3): jax.block_until_ready(f(*args))
    ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append((time.perf_counter() - t) * 1e3)
    ts.sort(); return ts[len(ts) // 2]
def temp(f, args):
    try:
        m = f.lower(*args).compile().memory_analysis(); return m.temp_size_in_bytes / 2**30
    except Exception: return float("nan")
grid = [("bfloat16", True, 128, 4096), ("bfloat16", True, 128, 8192), ("bfloat16", True, 64, 4096),
        ("bfloat16", True, 64, 8192), ("float16", True, 128, 4096), ("bfloat16", False, 128, 4096)]
if len(sys.argv) > 1: grid = grid[:int(sys.argv[1])]
print("dtype causal B N T H | cudnn ms | base ms (x cudnn) | full ms (x cudnn) | full/base | temp GiB cudnn/base/full", flush=True)
for dt, causal, H, T in grid:
    B, N = (2, 16) if H == 128 else (4, 16)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, N, H)), dt) for _ in range(3))
    g = jnp.asarray(rng.standard_normal((B, T, N, H)), dt)
    def step(fn):
        return jax.jit(jax.grad(lambda q, k, v, g: jnp.sum(fn(q, k, v).astype(jnp.float32) * g.astype(jnp.float32)), argnums=(0, 1, 2)))
    fns = {"cudnn": step(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")),
           "base": step(lambda q, k, v: ft.dot_product_attention(q, k, v, is_causal=causal, scheme="baseline", implementation="pallas")),
           "full": step(lambda q, k, v: ft.dot_product_attention(q, k, v, is_causal=causal, implementation="pallas"))}
    res = {}
    for name, f in fns.items():
        try:
            res[name] = (bench(f, (q, k, v, g)), temp(f, (q, k, v, g)))
        except Exception as e:
            res[name] = (float("nan"), float("nan")); print(name, "failed:", type(e).__name__, str(e)[:400], flush=True)
    c, b, fu = (res[n][0] for n in ("cudnn", "base", "full"))
    print(f"{dt} {causal:d} B{B} N{N} T{T} H{H} | {c:7.3f} | {b:7.3f} ({b/c:5.2f}x) | {fu:7.3f} ({fu/c:5.2f}x) | {fu/b:5.2f} | "
          f"{res['cudnn'][1]:.2f}/{res['base'][1]:.2f}/{res['full'][1]:.2f}", flush=True)
