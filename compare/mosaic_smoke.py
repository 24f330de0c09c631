"""A quick look at the Hopper kernel on a GPU: errors against float64, and each check's
largest residual/threshold on clean inputs, over a few shapes (``python -m compare.mosaic_smoke``)."""

from __future__ import annotations

import itertools
import sys

import numpy as np


def main() -> int:
    import jax
    import jax.numpy as jnp

    import ftattn_jax
    from ftattn_jax import fused

    if not fused.KERNELS["mosaic_gpu"].available():
        print(f"compare.mosaic_smoke: needs an sm_90 (Hopper) GPU; this machine's default device is "
              f"{jax.devices()[0].device_kind!r}")
        return 2
    print(f"jax {jax.__version__} device {jax.devices()[0].device_kind}", flush=True)
    shapes = [(1, 256, 2, 2, 256, 64), (2, 200, 4, 2, 300, 128), (1, 300, 2, 1, 200, 128)]
    for (B, T, N, K, S, H), causal, dtype in itertools.product(shapes, (False, True), ("float16", "bfloat16")):
        ks = jax.random.split(jax.random.PRNGKey(T + S + H), 3)
        q = jax.random.normal(ks[0], (B, T, N, H), dtype)
        k = jax.random.normal(ks[1], (B, S, K, H), dtype)
        v = jax.random.normal(ks[2], (B, S, K, H), dtype)
        qf, kf, vf = (np.asarray(x, np.float64) for x in (q, k, v))
        kf, vf = np.repeat(kf, N // K, axis=2), np.repeat(vf, N // K, axis=2)
        s = np.einsum("btnh,bsnh->bnts", qf, kf) / np.sqrt(H)
        if causal:
            s = np.where(np.arange(S)[None, :] <= np.arange(T)[:, None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ref = np.einsum("bnts,bsnh->btnh", p, vf)
        line = f"B{B} T{T} N{N} K{K} S{S} H{H} causal={causal:d} {dtype:8s}"
        for scheme in ("baseline", "full"):
            try:
                out, rep = ftattn_jax.attention(q, k, v, is_causal=causal, scheme=scheme, implementation="pallas",
                                                lowering="mosaic_gpu")
                err = np.abs(np.asarray(out, np.float64) - ref).max()
                ratios = {n: float(jnp.max(jnp.abs(c.residual) / c.threshold)) for n, c in rep.checks.items()}
                line += f" | {scheme}: err {err:.2e} det={bool(rep.detected):d} fin={bool(rep.inputs_finite):d} " + \
                    " ".join(f"{n}={r:.2g}" for n, r in ratios.items())
            except Exception as e:  # report and go on
                line += f" | {scheme}: FAILED {type(e).__name__}: {str(e)[:400]}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
