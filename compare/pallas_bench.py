"""The fused Pallas kernel beside JAX's fastest attention, on a GPU.

``python -m compare.pallas_bench`` times, in one process and on the same
inputs: ``jax.nn.dot_product_attention`` pinned to cuDNN and to XLA, JAX's own
Pallas-Triton attention example (``jax.experimental.pallas.ops.gpu.attention``),
and ``ftattn_jax.attention(..., implementation="pallas")`` with each scheme
(``baseline`` is the same kernel with the checks compiled out). It prints
milliseconds, TFLOP/s (4·B·N·T·S·H, halved for causal) and ratios to cuDNN,
and the extra memory of the checks. ``--sweep`` times block shapes.
Timing: the median of ``--reps`` timed batches of ``--inner`` calls each
(``block_until_ready`` after each batch), after warm-up.
"""

from __future__ import annotations

import argparse
import warnings

from ftattn_spec.implementations import run_checks

from . import results, timing
from .kernel_bench import add_shape_arguments


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m compare.pallas_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_shape_arguments(p)
    p.add_argument("--schemes", default="baseline,full,abft_qk_row,dmr_softmax,abft_pv_row",
                   help="comma-separated schemes to time")
    p.add_argument("--sweep", action="store_true", help="time block shapes of the kernel (full and baseline)")
    p.add_argument("--lowerings", default="triton,mosaic_gpu",
                   help="which kernels of implementation='pallas' to time (triton: portable; mosaic_gpu: Hopper)")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions")
    p.add_argument("--inner", type=int, default=5, help="calls per repetition (compare.timing.pipelined)")
    p.add_argument("--json", default=None, help="also write the rows to this file (compare's results schema)")
    return p.parse_args(argv)


#: Block shapes ``--sweep`` tries: (block_m, block_n, warps, stages).
SWEEP = ((128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3),
         (64, 128, 4, 2), (128, 128, 8, 3), (128, 64, 4, 2), (64, 64, 4, 2))


#: Settings of the Hopper kernel ``--sweep`` tries (``fused.MosaicBlocks`` fields; baseline and full,
#: or full alone where the setting only concerns the checks).
MOSAIC_SWEEP = (
    (dict(), ("baseline", "full")),
    (dict(ping_pong=False), ("baseline", "full")),
    (dict(late_checks=True), ("full",)),
    (dict(stages=3), ("baseline",)),
    (dict(block_kv=64), ("baseline", "full")),
    (dict(fma_cols=16), ("full",)),
    (dict(fma_cols=32), ("full",)),
    (dict(fma_cols=48), ("full",)),
    (dict(fma_cols=64), ("full",)),
    (dict(fma_cols=128), ("full",)),
)


def _time(fn, args, reps: int, inner: int) -> float:
    """Median milliseconds per call: JAX's protocol of every ``compare`` command
    (``compare.timing.pipelined``: ``inner`` calls back to back per repetition)."""
    import jax

    return timing.pipelined(fn, [args], jax.block_until_ready, warmup=2, reps=reps, calls=inner)["ms"]


def _temp_mib(fn, args):
    """Device memory XLA allocates for the call beyond its inputs and outputs (MiB), or None."""
    try:
        mem = fn.lower(*args).compile().memory_analysis()
        return mem.temp_size_in_bytes / 2 ** 20
    except Exception:  # not every backend reports it
        return None


def main(argv=None) -> int:
    a = _parse(argv)
    import jax

    import ftattn_jax
    from ftattn_jax import fused

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if jax.default_backend() != "gpu":
        print("compare.pallas_bench: needs a GPU (jax.default_backend() is "
              f"{jax.default_backend()!r}); the interpret mode is for tests, not timing")
        return 2
    dev = jax.devices()[0]
    print(f"device {dev.device_kind}  jax {jax.__version__}  B={a.batch} N={a.heads} "
          f"K={a.kv_heads or a.heads} H={a.head_dim} {a.dtype} causal={a.causal}")
    rows = []
    for T in a.seq:
        key = jax.random.split(jax.random.PRNGKey(T), 3)
        K = a.kv_heads or a.heads
        q = jax.random.normal(key[0], (a.batch, T, a.heads, a.head_dim), a.dtype)
        k = jax.random.normal(key[1], (a.batch, T, K, a.head_dim), a.dtype)
        v = jax.random.normal(key[2], (a.batch, T, K, a.head_dim), a.dtype)
        flops = 4.0 * a.batch * a.heads * T * T * a.head_dim * (0.5 if a.causal else 1.0)
        cands = {}
        for impl in ("cudnn", "xla"):
            cands[f"jax.nn {impl}"] = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
                q, k, v, is_causal=a.causal, implementation=impl))
        try:
            from jax.experimental.pallas.ops.gpu import attention as pallas_example

            if K == a.heads:
                cands["pallas example (triton)"] = jax.jit(lambda q, k, v: pallas_example.mha(
                    q, k, v, None, sm_scale=a.head_dim ** -0.5, causal=a.causal))
        except ImportError as e:
            print(f"  pallas example unavailable: {e}")
        lowerings = a.lowerings.split(",")
        if "mosaic_gpu" in lowerings:
            try:
                from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu_example

                if a.head_dim % 64 == 0:
                    cfg = mgpu_example.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2,
                                                    causal=a.causal)
                    cands["mosaic example (FA3)"] = jax.jit(lambda q, k, v: mgpu_example.attention(q, k, v, cfg))
            except ImportError as e:
                print(f"  Mosaic GPU example unavailable: {e}")
        for low in lowerings:
            tag = "pallas" if low == "triton" else "mosaic"
            for scheme in a.schemes.split(","):
                cands[f"ftattn {tag} {scheme}"] = jax.jit(lambda q, k, v, s=scheme, low=low: ftattn_jax.attention(
                    q, k, v, scheme=s, is_causal=a.causal, implementation="pallas", lowering=low))
        if a.sweep:
            for (bm, bn, w, st), scheme in [(b, s) for b in SWEEP for s in ("baseline", "full")
                                            if "triton" in lowerings]:
                    bs = fused.BlockSizes(bm, bn, w, st)
                    cands[f"sweep {scheme} {bm}x{bn} w{w} s{st}"] = jax.jit(
                        lambda q, k, v, s=scheme, bs=bs: fused.run(
                            q, k, v, checks=run_checks("pallas", s), granularity="vector", scale=a.head_dim ** -0.5,
                            is_causal=a.causal, interpret=False, blocks=bs, lowering="triton"))
            for kw, schemes in (MOSAIC_SWEEP if "mosaic_gpu" in lowerings else ()):
                for scheme in schemes:
                    bs = fused.MosaicBlocks(**kw)
                    tag = " ".join(f"{k}={v}" for k, v in kw.items()) or "default"
                    cands[f"sweep mosaic {scheme} {tag}"] = jax.jit(
                        lambda q, k, v, s=scheme, bs=bs: fused.run(
                            q, k, v, checks=run_checks("pallas", s), granularity="vector", scale=a.head_dim ** -0.5,
                            is_causal=a.causal, interpret=False, blocks=bs, lowering="mosaic_gpu"))
        base = None
        for name, fn in cands.items():
            try:
                ms = _time(fn, (q, k, v), a.reps, a.inner)
            except Exception as e:  # a candidate that cannot run here is reported, not fatal
                print(f"  T={T:6d} {name:34s} failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
                continue
            if name == "jax.nn cudnn":
                base = ms
            row = dict(T=T, name=name, ms=ms, tflops=flops / ms / 1e9, vs_cudnn=(base / ms) if base else None,
                       temp_mib=_temp_mib(fn, (q, k, v)))
            rows.append(row)
            ratio = f"{row['vs_cudnn']:.3f}x cuDNN" if base else ""
            mem = f"  temp {row['temp_mib']:.1f} MiB" if row["temp_mib"] is not None else ""
            print(f"  T={T:6d} {name:34s} {ms:8.3f} ms {row['tflops']:7.1f} TFLOP/s  {ratio}{mem}", flush=True)
        for tag in ("pallas", "mosaic"):
            full = next((r["ms"] for r in rows if r["T"] == T and r["name"] == f"ftattn {tag} full"), None)
            off = next((r["ms"] for r in rows if r["T"] == T and r["name"] == f"ftattn {tag} baseline"), None)
            if full and off:
                print(f"  T={T:6d} {tag} checks overhead (full / baseline - 1): {100 * (full / off - 1):+.1f}%")
    if a.json:
        env = {"jax": {"jax": jax.__version__, "device": dev.device_kind}}
        results.save(a.json, results.document("pallas-bench", vars(a), env, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
