"""softmax_dmr of the JAX fused forward (Hopper Mosaic kernel, the default; and the Pallas Triton lowering)
on clean inputs of large logits on the H200: the worst row ratio.
    PYTHONPATH=. python3 docs/data/dmr-large-logits-h200-2026-12-03/dmr_jax.py [label]"""
import os, sys, warnings
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
warnings.filterwarnings("ignore")
import jax, jax.numpy as jnp
import ftattn_jax
label = sys.argv[1] if len(sys.argv) > 1 else ""
for B, T, N, H, amp, dt, causal in ((2, 2048, 8, 64, 4.0, jnp.float16, False), (1, 4096, 4, 128, 8.0, jnp.bfloat16, False),
                                    (1, 4096, 4, 64, 8.0, jnp.bfloat16, True), (1, 4096, 4, 128, 1.0, jnp.bfloat16, False)):
    ks = jax.random.split(jax.random.key(T + H), 3)
    q, k, v = ((amp * jax.random.normal(kk, (B, T, N, H))).astype(dt) for kk in ks)
    row = []
    for lowering in ("auto", "triton"):
        _, rep = ftattn_jax.attention(q, k, v, is_causal=causal, implementation="pallas", lowering=lowering)
        c = rep.checks["softmax_dmr"]
        row.append(f"{lowering}: {float(jnp.max(c.residual / c.threshold)):.3f}")
    print(f"[{label} B={B} T={T} N={N} H={H} x{amp} {jnp.dtype(dt).name} causal={causal:d}] dmr worst ratio " + ", ".join(row), flush=True)
