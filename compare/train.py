"""Time training: forward plus backward, and the step's peak memory, beside SDPA and ``jax.nn``.

``python -m compare.train [--backends jax,torch] [--T 4096] [--dtype bfloat16] [--out DIR]``
times one forward plus backward step per framework and function with the framework's
protocol (``compare.timing``: PyTorch CUDA events on a GPU, JAX pipelined calls), and its
ratio to the fastest unprotected row (``F.scaled_dot_product_attention``, which picks cuDNN
or flash on a GPU; ``jax.nn.dot_product_attention``, also pinned to cuDNN on a GPU; ftattn's
``baseline``). Memory: in PyTorch the peak allocation of one step beyond what it started
with; in JAX the compiled step's temporary buffers. ftattn runs its default scheme ``full``
(forward and backward checked, with the fused kernels on a GPU) and ``baseline``
(unchecked): their ratio is the checks' cost. The rows go into ``results.json`` under
``--out`` in the schema of every ``compare`` command (``"pass": "fwd+bwd"``), with
``plot.png`` and ``plot.csv``; ``python -m compare.report`` re-renders them. Without a GPU
it uses a small shape in float32 and the unfused path, and says so.
"""

from __future__ import annotations

import argparse
import datetime
import os

import numpy as np

from . import results, timing
from .merge import tflops


def _shape_label(B, N, T, H) -> str:
    return f"B={B} N={N} T={T} S={T} H={H}"


def _row(framework, name, impl, B, N, T, H, causal, timed, mem, peer):
    flops = 4.0 * B * N * T * T * H * (0.5 if causal else 1.0) * 3.5  # backward ≈ 2.5× the forward
    row = {"shape": _shape_label(B, N, T, H), "T": T, "S": T, "scheme": name, "backend": framework,
           "implementation": impl, "pass": "fwd+bwd", "peer": peer, "detected": False, "ms": timed["ms"],
           "tflops": tflops(flops, timed["ms"]), "peak_gib": mem}
    row.update({k: timed[k] for k in ("times_ms", "iqr_ms", "dispatch_ms", "protocol") if k in timed})
    return row


def run_torch(B, N, T, H, dtype, causal, rows, reps=10, warmup=3):
    import torch
    import torch.nn.functional as F

    import ftattn_torch

    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, N, T, H, generator=g).to(dev, getattr(torch, dtype)).requires_grad_(True)
               for _ in range(3))
    go = torch.randn(B, N, T, H, generator=g).to(dev, getattr(torch, dtype))
    impl = "triton" if gpu else "unfused"
    fns = {("F.sdpa", "unfused", True): lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}
    for scheme in ("baseline", "full"):
        fns[(scheme, impl, False)] = lambda s=scheme: ftattn_torch.attention(
            q, k, v, is_causal=causal, scheme=s, implementation=impl)[0]

    def step(fn):
        def run():
            out = fn()
            torch.autograd.backward(out, go)
            for x in (q, k, v):
                x.grad = None
        return run

    for (name, im, peer), fn in fns.items():
        run = step(fn)
        timed = timing.measure(run, [()], backend_name="torch", on_gpu=gpu, sync=lambda r: None,
                               torch=torch, warmup=warmup, reps=reps)
        peak = None
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        rows.append(_row("torch", name, im, B, N, T, H, causal, timed, peak, peer))


def run_jax(B, N, T, H, dtype, causal, rows, reps=10, warmup=3):
    import jax
    import jax.numpy as jnp

    import ftattn_jax

    gpu = jax.default_backend() == "gpu"
    rng = np.random.default_rng(0)
    q, k, v, go = (jnp.asarray(rng.standard_normal((B, T, N, H)), dtype) for _ in range(4))
    impl = "pallas" if gpu else "unfused"

    def grad_step(f):
        def loss(q, k, v, go):  # dO an argument, not a constant XLA would fold at compile time
            return jnp.sum(f(q, k, v).astype(jnp.float32) * go.astype(jnp.float32))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    fns = {("jax.nn", "unfused", True): grad_step(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal))}
    if gpu:
        fns[("jax.nn cudnn", "unfused", True)] = grad_step(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn"))
    for scheme in ("baseline", "full"):
        fns[(scheme, impl, False)] = grad_step(lambda q, k, v, s=scheme: ftattn_jax.dot_product_attention(
            q, k, v, is_causal=causal, scheme=s, implementation=impl))
    for (name, im, peer), fn in fns.items():
        try:
            timed = timing.measure(fn, [(q, k, v, go)], backend_name="jax", on_gpu=gpu,
                                   sync=jax.block_until_ready, warmup=warmup, reps=reps)
            temp = fn.lower(q, k, v, go).compile().memory_analysis()
            mem = None if temp is None else temp.temp_size_in_bytes / 2**30
        except Exception as e:  # noqa: BLE001 - cuDNN refuses some shapes and dtypes: a skipped row says why
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
            rows.append({"shape": _shape_label(B, N, T, H), "T": T, "S": T, "scheme": name, "backend": "jax",
                         "implementation": im, "pass": "fwd+bwd", "peer": peer, "detected": False,
                         "ms": float("nan"), "skipped": reason})
            continue
        rows.append(_row("jax", name, im, B, N, T, H, causal, timed, mem, peer))


def relate(rows: list[dict]) -> None:
    """Each row's ratio to the fastest unprotected row of its framework and shape, and ftattn
    ``full``'s overhead over ``baseline`` of the same implementation."""
    for r in rows:
        same = [x for x in rows if x["backend"] == r["backend"] and x["shape"] == r["shape"] and x["ms"] == x["ms"]]
        plain = [x["ms"] for x in same if x.get("peer") or x["scheme"] == "baseline"]
        if plain and r["ms"] == r["ms"]:
            r["vs_fastest_unprotected"] = r["ms"] / min(plain)
        base = [x["ms"] for x in same if x["scheme"] == "baseline" and x["implementation"] == r["implementation"]]
        r["overhead"] = r["ms"] / base[0] - 1.0 if base and not r.get("peer") else float("nan")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m compare.train", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backends", "--framework", dest="framework", default="jax,torch",
                   choices=("jax", "torch", "jax,torch", "torch,jax", "both"), metavar="jax,torch",
                   help="which frameworks (the name every compare command uses; --framework is the old one)")
    for axis, gpu_default in (("B", 2), ("N", 16), ("T", 4096), ("H", 128)):
        p.add_argument(f"--{axis}", type=int, default=None, help=f"default {gpu_default} on a GPU, small on a CPU")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="default bfloat16 on a GPU, float32 elsewhere")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True, help="causal attention")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions")
    p.add_argument("--out", default=None, help="output folder (default results/train-<timestamp>/)")
    p.add_argument("--wide", action="store_true", help="every column in the table")
    return p


def main(argv=None) -> int:
    p = parser()
    a = p.parse_args(argv)
    from .run_options import has_gpu as _has_gpu

    gpu = _has_gpu()
    B, N, T, H = (a.B or (2 if gpu else 1), a.N or (16 if gpu else 2), a.T or (4096 if gpu else 64),
                  a.H or (128 if gpu else 16))
    for name, n in (("--B", B), ("--N", N), ("--T", T), ("--H", H)):
        if n < 1:
            p.error(f"{name}: expected >= 1, got {n}")
    if a.reps < 1 or a.warmup < 0:
        p.error(f"--reps >= 1 and --warmup >= 0 expected, got {a.reps} and {a.warmup}")
    dtype = a.dtype or ("bfloat16" if gpu else "float32")
    try:
        out = results.output_folder(a.out or os.path.join(
            "results", "train-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")))
    except SystemExit as e:  # a folder that cannot be written is a usage error (status 2)
        p.error(str(e.code))
    rows: list = []
    backends = {}
    if "torch" in a.framework or a.framework == "both":
        run_torch(B, N, T, H, dtype, a.causal, rows, a.reps, a.warmup)
        import torch

        backends["torch"] = {"torch": torch.__version__,
                             "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    if "jax" in a.framework or a.framework == "both":
        run_jax(B, N, T, H, dtype, a.causal, rows, a.reps, a.warmup)
        import jax

        backends["jax"] = {"jax": jax.__version__, "device": jax.devices()[0].device_kind}
    relate(rows)
    title = (f"forward + backward, {dtype}, causal={a.causal}; median of {a.reps} after {a.warmup} warm-ups"
             + ("" if gpu else " (no GPU: the unfused path)"))
    results.render(rows, title, wide=a.wide)
    config = dict(vars(a), B=B, N=N, T=T, H=H, dtype=dtype, preset=None, method="robust")
    results.save(os.path.join(out, "results.json"), results.document("train", config, backends, rows))
    results.plot(rows, os.path.join(out, "plot.png"), title)
    print(f"# wrote {out}/results.json, plot.png and plot.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
