"""Forward time of the default checked path (scheme "full") against cuDNN in the same process, for the code
on PYTHONPATH (run once with the old kernels, once with the new; compare the ratios).
    PYTHONPATH=. python3 docs/data/dmr-large-logits-h200-2026-12-03/dmr_cost.py label"""
import os, sys, warnings
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
warnings.filterwarnings("ignore")
import jax, jax.numpy as jnp, torch
import ftattn_jax, ftattn_torch
from torch.nn.attention import sdpa_kernel, SDPBackend
from compare.timing import pipelined
B, T, N, H = 2, 8192, 16, 128
ks = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.random.normal(x, (B, T, N, H), jnp.bfloat16) for x in ks)
ins = [(q, k, v)]
sync = jax.block_until_ready
ft = jax.jit(lambda q, k, v: ftattn_jax.attention(q, k, v)[0])
cd = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
a, b = pipelined(ft, ins, sync)["ms"], pipelined(cd, ins, sync)["ms"]
tq, tk, tv = (torch.randn(B, N, T, H, device="cuda", dtype=torch.bfloat16) for _ in range(3))
def med(f, n=20):
    for _ in range(3): f()
    torch.cuda.synchronize(); ts = []
    for _ in range(n):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(); f(); e1.record(); torch.cuda.synchronize(); ts.append(e0.elapsed_time(e1))
    return sorted(ts)[n // 2]
def cud():
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
with torch.no_grad():
    c, d = med(lambda: ftattn_torch.attention(tq, tk, tv, implementation="triton")), med(cud)
print(f"[{sys.argv[1]}] B={B} T={T} N={N} H={H} bf16 full fwd: jax {a:.3f} ms, cudnn {b:.3f} ms ({b/a:.3f}x); torch triton {c:.3f} ms, cudnn {d:.3f} ms ({d/c:.3f}x)", flush=True)
