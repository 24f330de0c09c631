"""ptxas' report (registers, spills, wgmma serialization) for the Hopper kernel in turn and overlapped.
    MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_SASS=1 MOSAIC_GPU_DUMP_TO=$OUT/dump PYTHONPATH=. python3 hopper_ptxas.py NAME"""
import os, sys
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax, jax.numpy as jnp
from ftattn_jax import fused
name = sys.argv[1]
ov = "ov" in name
causal = "causal" in name
checks = {"off": (), "abft": ("qk_row", "softmax_exp", "pv_row"), "full": ("qk_row", "softmax_dmr", "pv_row")}[name.split("-")[0]]
ks = jax.random.split(jax.random.PRNGKey(0), 3)
q, k, v = (jax.random.normal(x, (1, 512, 2, 128), jnp.float16) for x in ks)
o, r = fused.run(q, k, v, checks=checks, granularity="vector", scale=128 ** -0.5, is_causal=causal,
                 lowering="mosaic_gpu", blocks=fused.MosaicBlocks(overlap=ov))
jax.block_until_ready(o)
print(name, "ran")
