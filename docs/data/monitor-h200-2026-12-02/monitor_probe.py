"""The JAX counters on the H200: a jax.Ref per site block (default now) against the host callback
(the previous default) and no counting at all; plus the monitor's verdict of a fault on the GPU."""
import os, time, sys
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax, jax.numpy as jnp, numpy as np
import ftattn_jax
from ftattn_jax import counters, monitor
from ftattn_spec import Fault
from compare import timing
print(jax.__version__, jax.devices(), flush=True)
orig_ok, orig_record = counters._on_device_ok, counters.record
modes = {"ref": lambda: None,
         "callback": lambda: setattr(counters, "_on_device_ok", lambda: False),
         "none": lambda: setattr(counters, "record", lambda *a, **k: None)}
def restore():
    counters._on_device_ok = orig_ok; counters.record = orig_record
rows = []
for T, B in ((512, 2), (4096, 2), (8192, 2)):
    ks = jax.random.split(jax.random.PRNGKey(T), 6)
    ins = [tuple(jax.random.normal(ks[i + j], (B, T, 32, 128), jnp.float16) for j in range(3)) for i in (0, 3)]
    for scheme in ("baseline", "full"):
        res = {}
        for mode, setup in modes.items():
            restore(); setup()
            f = jax.jit(lambda q, k, v, s=scheme: ftattn_jax.attention(q, k, v, scheme=s, site=f"T{T}")[0])
            jax.block_until_ready(f(*ins[0]))
            r = timing.pipelined(f, ins, jax.block_until_ready)
            res[mode] = r
        restore()
        line = f"T={T} B={B} {scheme}: " + "; ".join(f"{m} {r['ms']:.3f} ms (dispatch {r['dispatch_ms']:.3f})" for m, r in res.items())
        print(line, flush=True)
# a 4-layer jitted step: per-step cost of each mode
def model(q, k, v):
    x = q
    for i in range(4):
        x = ftattn_jax.attention(x, k, v, site=f"layer {i}")[0]
    return x
ks = jax.random.split(jax.random.PRNGKey(7), 3)
q, k, v = (jax.random.normal(kk, (2, 1024, 32, 128), jnp.float16) for kk in ks)
for mode, setup in modes.items():
    restore(); setup()
    f = jax.jit(model); jax.block_until_ready(f(q, k, v))
    r = timing.pipelined(f, [(q, k, v)], jax.block_until_ready)
    print(f"4 layers T=1024: {mode} {r['ms']:.3f} ms (dispatch {r['dispatch_ms']:.3f})", flush=True)
restore()
# the monitor on the GPU: a fault through the portable kernel (the Hopper kernel takes no plan), forward and backward
counters.reset(); mon = monitor.Monitor()
def loss(q, k, v, plan):
    o, r = ftattn_jax.attention(q, k, v, site="layer 1", fault=plan, implementation="pallas")
    return o.astype(jnp.float32).sum()
qs, kss, vs = (x[:, :256] for x in (q, k, v))
g = jax.jit(jax.value_and_grad(loss))
g(qs, kss, vs, Fault("probs", (1, 5, 17, 40), bit=30))
v1 = mon.step(); print(v1.summary(), {s: (x.calls, x.detected) for s, x in v1.sites.items()}, flush=True)
g(qs, kss, vs, None); v2 = mon.step(); print(v2.summary(), flush=True)
