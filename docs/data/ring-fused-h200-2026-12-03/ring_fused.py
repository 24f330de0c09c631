"""Ring attention with fused blocks on the H200 (2026-12-03). JAX: ring_local under jax.vmap with a
named axis (P 'devices' share one GPU), blocks by the portable Pallas kernel or the unfused core;
clean ratios, error against a float32 reference, forward and forward+backward time beside one-device
ftattn (default path) and jax.nn cuDNN, faults at every site a fused ring takes. PyTorch: the ring
over one gloo process (P=1) on the GPU with Triton blocks: error, gradients."""
import functools, json, os, sys, time, socket
import numpy as np
import jax, jax.numpy as jnp
import ftattn_jax
from ftattn_jax import sharding
from ftattn_spec import ring, implementations
from ftattn_spec.ring import RingFault

OUT = os.environ.get("OUT", "/tmp")
print(jax.__version__, jax.devices()[0].device_kind, flush=True)
res = {"jax": jax.__version__, "clean": [], "time": [], "faults": []}


def timeit(f, *a, n=10):
    jax.block_until_ready(f(*a)); jax.block_until_ready(f(*a))
    ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3


def ring_fn(P, scheme, causal, impl, H, rp=None):
    checks = ring.row_checks(implementations.checks_for("jax", impl, scheme))
    loc = functools.partial(sharding.ring_local, axis_name="seq", axis_size=P, checks=checks, scale=H ** -0.5,
                            is_causal=causal, implementation=impl)
    v = jax.vmap(loc, in_axes=(0, 0, 0, None), axis_name="seq")
    def f(q, k, vv, rp=rp):
        B, T, N, H = q.shape
        split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], P, x.shape[1] // P, *x.shape[2:]), 1, 0)
        o, blocks, rc, steps, fin = v(split(q), split(k), split(vv), rp)
        return jnp.moveaxis(o, 0, 1).reshape(B, T, N, H).astype(q.dtype), blocks, rc, steps
    return f, checks


def ref32(q, k, v, causal):
    return jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                        is_causal=causal, implementation="xla")


rng = np.random.default_rng(0)
B, N, K, H = 1, 16, 8, 128
for dtype, causal, P, T in ((jnp.bfloat16, False, 4, 8192), (jnp.float16, True, 8, 8192), (jnp.bfloat16, True, 4, 16384)):
    q, k, v = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))
    w = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
    r = ref32(q, k, v, causal) if T <= 8192 else None
    row = dict(dtype=jnp.dtype(dtype).name, causal=causal, P=P, T=T)
    one = jax.jit(lambda q, k, v: ftattn_jax.attention(q, k, v, is_causal=causal)[0])
    cud = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn"))
    for impl in ("pallas", "unfused"):
        for scheme in (("full", "abft_all") if impl == "pallas" else ("full",)):
            if impl == "unfused" and T > 8192:
                continue
            f, checks = ring_fn(P, scheme, causal, impl, H)
            jf = jax.jit(f)
            o, blocks, rc, steps = jf(q, k, v)
            worst = {n: float(jnp.max(c.residual / c.threshold)) for n, c in {**blocks, **rc}.items()}
            flagged = int(sum(int(jnp.sum(c.flagged)) for c in {**blocks, **rc}.values()))
            e = None if r is None else float(jnp.max(jnp.abs(o.astype(jnp.float32) - r)))
            row[f"{impl}/{scheme}"] = dict(flagged=flagged, err=e, worst=worst, fwd_ms=timeit(lambda q, k, v: jf(q, k, v)[0], q, k, v))
            if scheme == "full":
                g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)[0].astype(jnp.float32) * w), argnums=(0, 1, 2)))
                row[f"{impl}/{scheme}"]["fwd_bwd_ms"] = timeit(g, q, k, v, n=5)
                if r is not None:
                    gr = jax.grad(lambda q, k, v: jnp.sum(ref32(q, k, v, causal) * w), argnums=(0, 1, 2))(q, k, v)
                    gg = g(q, k, v)
                    row[f"{impl}/{scheme}"]["grad_err"] = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b))) for a, b in zip(gg, gr)]
            print(row["dtype"], causal, P, T, impl, scheme, row[f"{impl}/{scheme}"], flush=True)
    o1 = one(q, k, v)
    row["one_device_err"] = None if r is None else float(jnp.max(jnp.abs(o1.astype(jnp.float32) - r)))
    row["one_device_ms"] = timeit(one, q, k, v)
    row["cudnn_ms"] = timeit(cud, q, k, v)
    gc = jax.jit(jax.grad(lambda q, k, v: jnp.sum(cud(q, k, v).astype(jnp.float32) * w), argnums=(0, 1, 2)))
    row["cudnn_fwd_bwd_ms"] = timeit(gc, q, k, v, n=5)
    g1 = jax.jit(jax.grad(lambda q, k, v: jnp.sum(one(q, k, v).astype(jnp.float32) * w), argnums=(0, 1, 2)))
    row["one_device_fwd_bwd_ms"] = timeit(g1, q, k, v, n=5)
    if r is not None:
        gr = jax.grad(lambda q, k, v: jnp.sum(ref32(q, k, v, causal) * w), argnums=(0, 1, 2))(q, k, v)
        gc_ = gc(q, k, v)
        row["cudnn_grad_err"] = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b))) for a, b in zip(gc_, gr)]
    print({x: row[x] for x in row if "ms" in x or "err" in x}, flush=True)
    res["clean"].append(row)
    json.dump(res, open(os.path.join(OUT, "ring_fused.json"), "w"), indent=1)

# faults, fused blocks, P=8, bf16, T=4096
P, T = 8, 4096
q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in ((1, T, 8, 128), (1, T, 4, 128), (1, T, 4, 128)))
faults = [RingFault("probs", (0, 3, 1000, 3000), bit=27), RingFault("scores", (0, 5, 4000, 100), bit=25),
          RingFault("out", (0, 1, 2049, 6), step=5, bit=26), RingFault("merge", (0, 6, 3333, 5), step=4, bit=24),
          RingFault("key", (0, 1, 1500, 5), step=6, bit=12), RingFault("value", (0, 3, 2500, 7), step=2, bit=11)]
for scheme in ("full", "abft_all"):
    checks = ring.row_checks(implementations.checks_for("jax", "pallas", scheme))
    dims = dict(B=1, T=T, S=T, N=8, K=4, H=128)
    for fl in faults:
        rp = jax.tree.map(jnp.asarray, ring.plan(fl, dims, P, "bfloat16", checks))
        f, _ = ring_fn(P, scheme, False, "pallas", 128, rp)
        o, blocks, rc, steps = jax.jit(f)(q, k, v)
        got = {n: int(jnp.sum(c.flagged)) for n, c in {**blocks, **rc}.items()}
        st = [tuple(map(int, x)) for x in np.argwhere(np.asarray(steps[:, 0]))]
        res["faults"].append(dict(site=fl.site, scheme=scheme, flagged=got, steps=st))
        print("fault", fl.site, scheme, {n: x for n, x in got.items() if x}, st, flush=True)
json.dump(res, open(os.path.join(OUT, "ring_fused.json"), "w"), indent=1)
