"""Ring attention's checks on the H200: the JAX ring (ftattn_jax.sharding.ring_local) run under
jax.vmap with a named axis, so P 'devices' share one GPU and its arithmetic. Per case: the largest
clean ratio of every check, the error against float64 next to one-device ftattn's, and faults."""
import functools, json, os, sys, time
import numpy as np
import jax, jax.numpy as jnp
import ftattn_jax
from ftattn_jax import sharding
from ftattn_spec import ring
from ftattn_spec.ring import RingFault

OUT = os.environ.get("OUT", "/tmp")
print(jax.__version__, jax.devices()[0].device_kind, flush=True)
rows = []


def run_ring(q, k, v, P, scheme, causal, fault=None):
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], P, x.shape[1] // P, *x.shape[2:]), 1, 0)
    checks = ring.row_checks(ftattn_jax.api.implementations.checks_for("jax", "unfused", scheme))
    dims = dict(B=B, T=T, S=S, N=N, K=K, H=H)
    rp = ring.plan(fault, dims, P, jnp.dtype(q.dtype).name, checks)
    rp = None if rp is None else jax.tree.map(jnp.asarray, rp)
    f = jax.jit(jax.vmap(functools.partial(sharding.ring_local, axis_name="seq", axis_size=P, checks=checks,
                                           scale=H ** -0.5, is_causal=causal),
                         in_axes=(0, 0, 0, None), axis_name="seq"))
    o, blocks, rc, steps, fin = f(split(q), split(k), split(v), rp)
    o = jnp.moveaxis(o, 0, 1).reshape(B, T, N, H)
    return o, blocks, rc, steps


def ref64(q, k, v, causal):
    q, k, v = (np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v))
    G = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, G, 2), np.repeat(v, G, 2)
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


rng = np.random.default_rng(0)
for dtype in ((jnp.bfloat16, jnp.float16) if not os.environ.get("ONLY_F16") else (jnp.float16,)):
    for P, Tc in (((4, 1024), (8, 512)) if not os.environ.get("SMALL") else ((4, 8),)) if not os.environ.get("ONLY_F16") else ((8, 512),):
        for causal in (False, True):
            for scale in ((1.0, 4.0) if not os.environ.get("ONLY_F16") else (4.0,)):
                B, N, K, H = (1, 8, 4, 128) if not os.environ.get("SMALL") else (1, 4, 2, 16)
                T = P * Tc
                q, k, v = (jnp.asarray(rng.standard_normal(s) * (scale if i < 2 else 1.0), dtype)
                           for i, s in enumerate(((B, T, N, H), (B, T, K, H), (B, T, K, H))))
                for scheme in ("full", "abft_all"):
                    o, blocks, rc, steps = run_ring(q, k, v, P, scheme, causal)
                    single, _ = ftattn_jax.attention(q, k, v, scheme="baseline", is_causal=causal, implementation="unfused")
                    r = ref64(q, k, v, causal)
                    worst = {n: float(jnp.max(c.residual / c.threshold)) for n, c in {**blocks, **rc}.items()}
                    flagged = int(sum(int(jnp.sum(c.flagged)) for c in {**blocks, **rc}.values()))
                    row = dict(dtype=jnp.dtype(dtype).name, P=P, T=T, causal=causal, scale=scale, scheme=scheme,
                               flagged=flagged, err=float(np.abs(np.asarray(o, np.float64) - r).max()),
                               single_err=float(np.abs(np.asarray(single, np.float64) - r).max()), worst=worst)
                    rows.append(row)
                    print(f"{row['dtype']:8s} P={P} T={T} causal={causal!s:5s} x{scale:<3} {scheme:8s} flagged={flagged} "
                          f"err={row['err']:.2e} one-device={row['single_err']:.2e} worst: " +
                          " ".join(f"{n}={x:.3f}" for n, x in worst.items()), flush=True)
# faults at every ring site, P=8
L, NN, KK, HH = (4096, 8, 4, 128) if not os.environ.get("SMALL") else (4096, 8, 4, 8)
q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in ((1, L, NN, HH), (1, L, KK, HH), (1, L, KK, HH)))
faults = [RingFault("probs", (0, 3, 1000, 3000), bit=27), RingFault("scores", (0, 5, 4000, 100), bit=25),
          RingFault("out", (0, 1, 2049, 6), step=5, bit=26), RingFault("lse", (0, 2, 700), step=3, bit=22),
          RingFault("merge", (0, 6, 3333, 5), step=4, bit=24), RingFault("key", (0, 1, 1500, 5), step=6, bit=12),
          RingFault("value", (0, 3, 2500, 7), step=2, bit=11)]
fres = []
for f in faults:
    for scheme in ("full", "abft_all"):
        o, blocks, rc, steps = run_ring(q, k, v, 8, scheme, False, f)
        fl = {n: int(jnp.sum(c.flagged)) for n, c in {**blocks, **rc}.items()}
        st = [tuple(map(int, x)) for x in np.argwhere(np.asarray(steps[:, 0]))]
        fres.append(dict(site=f.site, scheme=scheme, flagged=fl, steps=st))
        print(f"fault {f.site:6s} {scheme:8s} flagged={ {n: x for n, x in fl.items() if x} } (device, step)={st}", flush=True)
json.dump(dict(clean=rows, faults=fres, jax=jax.__version__), open(os.path.join(OUT, "ring_gpu.json"), "w"), indent=1)
