"""The rings' checked backward on one H200 (P=1: one device holds the whole sequence): forward and
forward+backward time of scheme "baseline" (unchecked backward) and "full" (checked backward),
beside cuDNN, in both backends; one backward fault per backend.
    PYTHONPATH=. python3 docs/data/ring-bwd-h200-2026-12-03/ring_bwd.py"""
import os, sys, time, warnings
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
warnings.filterwarnings("ignore")
import numpy as np
T0 = time.time()
def say(*a): print(f"[{time.time()-T0:4.0f}s]", *a, flush=True)
SHAPES = ((1, 16, 8, 4096, 128, "bfloat16", False), (1, 16, 8, 8192, 128, "bfloat16", False),
          (1, 16, 8, 8192, 128, "bfloat16", True))
from ftattn_spec.ring import RingFault

if "jax" in sys.argv[1:]:
    import jax, jax.numpy as jnp
    from jax.sharding import Mesh
    from ftattn_jax import sharding
    say("jax", jax.__version__, jax.devices()[0].device_kind)
    mesh = Mesh(np.array(jax.devices()[:1]), ("seq",))
    def med(f, *a, n=7):
        jax.block_until_ready(f(*a)); jax.block_until_ready(f(*a))
        ts = []
        for _ in range(n):
            t = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t)
        return float(np.median(ts)) * 1e3
    for B, N, K, T, H, dt, causal in SHAPES:
        ks = jax.random.split(jax.random.PRNGKey(T), 4)
        q = jax.random.normal(ks[0], (B, T, N, H), dt); k, v = (jax.random.normal(x, (B, T, K, H), dt) for x in ks[1:3])
        w = jax.random.normal(ks[3], (B, T, N, H), dt)
        row = {}
        for scheme in ("baseline", "full"):
            att = lambda q, k, v, s=scheme, f=None, of="report": sharding.ring_attention(
                q, k, v, mesh=mesh, axis_name="seq", scheme=s, is_causal=causal, fault=f, on_fault=of)[0]
            fw = jax.jit(att)
            loss = lambda q, k, v, a=att: jnp.sum(a(q, k, v).astype(jnp.float32) * w.astype(jnp.float32))
            bw = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            row[scheme] = (med(fw, q, k, v), med(bw, q, k, v))
        cf = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn"))
        cb = jax.jit(jax.grad(lambda q, k, v: jnp.sum(cf(q, k, v).astype(jnp.float32) * w.astype(jnp.float32)), argnums=(0, 1, 2)))
        cud = (med(cf, q, k, v), med(cb, q, k, v))
        (bf, bb), (ff, fb) = row["baseline"], row["full"]
        say(f"jax B{B} N{N} K{K} T{T} H{H} {dt} causal={causal:d}: fwd ms cudnn {cud[0]:.2f} baseline {bf:.2f} full {ff:.2f}; "
            f"fwd+bwd cudnn {cud[1]:.2f} baseline {bb:.2f} full {fb:.2f}; bwd alone (fwd+bwd - fwd) baseline {bb-bf:.2f} "
            f"full {fb-ff:.2f} ({(fb-ff)/(bb-bf)-1:+.0%}); full fwd+bwd {cud[1]/fb:.2f}x cudnn")
    B, N, K, T, H, dt, causal = SHAPES[0]
    fault = RingFault("bwd_dq", (0, 3, 1000, 5), step=0, value=7.0)
    from ftattn_jax import counters
    counters.reset()
    att = lambda q, k, v: sharding.ring_attention(q, k, v, mesh=mesh, axis_name="seq", scheme="full", is_causal=causal,
                                                  fault=fault, site="ring")[0]
    g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(att(q, k, v).astype(jnp.float32) * w.astype(jnp.float32)), argnums=(0, 1, 2)))(q, k, v)
    jax.block_until_ready(g)
    say("jax bwd_dq fault: counters", counters.read())

if "torch" in sys.argv[1:]:
    import torch, torch.distributed as dist
    from ftattn_torch.distributed import ring_attention
    from ftattn_torch import FaultDetected
    say("torch", torch.__version__, torch.cuda.get_device_name())
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    def med(f, n=7):
        f(); f(); torch.cuda.synchronize()
        ts = []
        for _ in range(n):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); f(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
        return float(np.median(ts))
    for B, N, K, T, H, dt, causal in SHAPES:
        dt = getattr(torch, dt)
        q = torch.randn(B, N, T, H, device="cuda", dtype=dt, requires_grad=True)
        k, v = (torch.randn(B, K, T, H, device="cuda", dtype=dt, requires_grad=True) for _ in range(2))
        g = torch.randn(B, N, T, H, device="cuda", dtype=dt)
        row = {}
        for scheme in ("baseline", "full"):
            def fw(s=scheme):
                with torch.no_grad():
                    ring_attention(q, k, v, scheme=s, is_causal=causal)
            def fb(s=scheme):
                o, _ = ring_attention(q, k, v, scheme=s, is_causal=causal)
                torch.autograd.grad(o, (q, k, v), g)
            row[scheme] = (med(fw), med(fb))
        kr, vr = (x.detach().repeat_interleave(N // K, 1).requires_grad_() for x in (k, v))
        from torch.nn.attention import sdpa_kernel, SDPBackend
        def cf():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION), torch.no_grad():
                torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=causal)
        def cb():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                o = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=causal)
            torch.autograd.grad(o, (q, kr, vr), g)
        cud = (med(cf), med(cb))
        (bf, bb), (ff, fb_) = row["baseline"], row["full"]
        say(f"torch B{B} N{N} K{K} T{T} H{H} {dt} causal={causal:d}: fwd ms cudnn {cud[0]:.2f} baseline {bf:.2f} full {ff:.2f}; "
            f"fwd+bwd cudnn {cud[1]:.2f} baseline {bb:.2f} full {fb_:.2f}; bwd alone baseline {bb-bf:.2f} full {fb_-ff:.2f} "
            f"({(fb_-ff)/(bb-bf)-1:+.0%}); full fwd+bwd {cud[1]/fb_:.2f}x cudnn; peak {torch.cuda.max_memory_allocated()/2**30:.1f} GiB")
    fault = RingFault("bwd_dq", (0, 3, 1000, 5), step=0, value=7.0)
    o, _ = ring_attention(q, k, v, scheme="full", is_causal=causal, fault=fault, on_fault="raise")
    try:
        torch.autograd.grad(o, (q, k, v), g)
        say("torch bwd_dq fault: NOT raised")
    except FaultDetected as e:
        say("torch bwd_dq fault raised FaultDetected; table", e.report.steps.tolist(),
            {n: int(c.flagged.sum()) for n, c in e.report.blocks.checks.items() if int(c.flagged.sum())})
    dist.destroy_process_group()
