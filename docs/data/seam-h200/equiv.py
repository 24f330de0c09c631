"""Run the public API of one tree (PYTHONPATH) on fixed inputs; save outputs, reports, times."""
import sys, time, json
import numpy as np

out_path = sys.argv[1]
res, times = {}, {}

def med(fn, sync, n=20):
    for _ in range(3):
        sync(fn())
    ts = []
    for _ in range(n):
        t = time.perf_counter(); sync(fn()); ts.append(time.perf_counter() - t)
    return float(np.median(ts))

def put(tag, out, rep, to_np):
    res[tag + "/out"] = to_np(out)
    res[tag + "/detected"] = to_np(rep.detected)
    for c, r in rep.checks.items():
        res[f"{tag}/{c}/res"] = to_np(r.residual); res[f"{tag}/{c}/thr"] = to_np(r.threshold)
    for k, v in rep.located.items():
        res[f"{tag}/loc/{k}"] = to_np(v)
    res[tag + "/corrected"] = to_np(rep.corrected)

# ---- JAX
import jax, jax.numpy as jnp
import ftattn_jax
from ftattn_spec import Fault
rng = np.random.default_rng(0)
B, T, N, K, S, H = 2, 1000, 8, 4, 1100, 128
for dt in ("float16", "bfloat16"):
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), dt)
    k = jnp.asarray(rng.standard_normal((B, S, K, H)), dt)
    v = jnp.asarray(rng.standard_normal((B, S, K, H)), dt)
    for lowering in ("auto", "triton"):
        for causal in (False, True):
            for scheme in ("baseline", "full"):
                f = jax.jit(lambda q, k, v, s=scheme, c=causal, lo=lowering: ftattn_jax.attention(
                    q, k, v, scheme=s, is_causal=c, implementation="pallas", lowering=lo))
                tag = f"jax/{dt}/{lowering}/{causal}/{scheme}"
                o, r = f(q, k, v)
                put(tag, o, r, np.asarray)
                times[tag] = med(lambda: f(q, k, v), jax.block_until_ready)
            o, r = ftattn_jax.attention(q, k, v, is_causal=causal, implementation="pallas", lowering=lowering,
                                        fault=Fault("scores", (1, 3, 77, 70), bit=27), on_fault="correct")
            put(f"jax/{dt}/{lowering}/{causal}/fault", o, r, np.asarray)
    g = jax.grad(lambda q, k, v: ftattn_jax.attention(q, k, v, is_causal=True, implementation="pallas")[0]
                 .astype(jnp.float32).sum(), argnums=(0, 1, 2))(q[:, :256], k[:, :300], v[:, :300])
    for i, x in enumerate(g):
        res[f"jax/{dt}/grad{i}"] = np.asarray(x)
# unfused with masks, small
q = jnp.asarray(rng.standard_normal((3, 40, 4, 16)), "float32")
k = jnp.asarray(rng.standard_normal((3, 50, 2, 16)), "float32")
v = jnp.asarray(rng.standard_normal((3, 50, 2, 16)), "float32")
o, r = ftattn_jax.attention(q, k, v, key_value_seq_lengths=jnp.array([50, 20, 33]), local_window_size=(9, 4),
                            fault=Fault("out", (2, 1, 7, 5), bit=28), on_fault="correct")
put("jax/unfused", o, r, np.asarray)

# ---- torch
import torch
import ftattn_torch
dev = "cuda"
tn = lambda x: x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
for dt in (torch.float16, torch.bfloat16):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, N, T, H, generator=g).to(dev, dt)
    k = torch.randn(B, K, S, H, generator=g).to(dev, dt)
    v = torch.randn(B, K, S, H, generator=g).to(dev, dt)
    for causal in (False, True):
        for scheme in ("baseline", "full"):
            tag = f"torch/{dt}/{causal}/{scheme}"
            fn = lambda s=scheme, c=causal: ftattn_torch.attention(q, k, v, scheme=s, is_causal=c, implementation="triton")
            o, r = fn()
            put(tag, o, r, tn)
            times[tag] = med(fn, lambda x: torch.cuda.synchronize())
        o, r = ftattn_torch.attention(q, k, v, is_causal=causal, implementation="triton",
                                      fault=Fault("probs", (1, 3, 77, 70), bit=29), on_fault="correct")
        put(f"torch/{dt}/{causal}/fault", o, r, tn)
        o, r = ftattn_torch.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True,
                                                        implementation="triton", return_report=True)
        put(f"torch/{dt}/{causal}/sdpa", o, r, tn)
    qg, kg, vg = (x[:, :, :256].clone().requires_grad_() for x in (q, k, v))
    ftattn_torch.attention(qg, kg, vg, is_causal=True, implementation="triton")[0].float().sum().backward()
    for i, x in enumerate((qg, kg, vg)):
        res[f"torch/{dt}/grad{i}"] = tn(x.grad)
q = torch.randn(3, 4, 40, 16, device=dev); k = torch.randn(3, 2, 50, 16, device=dev); v = torch.randn(3, 2, 50, 16, device=dev)
o, r = ftattn_torch.attention(q, k, v, key_value_seq_lengths=torch.tensor([50, 20, 33], device=dev), local_window_size=(9, 4),
                              fault=Fault("out", (2, 1, 7, 5), bit=28), on_fault="correct")
put("torch/unfused", o, r, tn)
np.savez(out_path, **res)
json.dump(times, open(out_path + ".times.json", "w"))
print("saved", len(res), "arrays")
