"""Time training: forward plus backward, and the step's peak memory, beside SDPA and ``jax.nn``.

``python -m compare.train [--framework torch|jax|both] [--T 4096] [--dtype bfloat16]``
prints one table: per framework and implementation, the median time of a forward
plus backward step (10 timed steps after 3 warm-ups, same process), its ratio to
the plain function's (``F.scaled_dot_product_attention``, which picks cuDNN or flash
on a GPU; ``jax.nn.dot_product_attention`` on cuDNN where it runs, else XLA), and in
PyTorch on a GPU the peak memory the step allocates beyond what it started with.
ftattn runs its default scheme ``full`` (forward and, with the Triton kernel,
backward checked) and ``baseline`` (unchecked): their ratio is the checks' cost.
Without a GPU it uses a small shape in float32 and says so.
"""

from __future__ import annotations

import argparse

import numpy as np

from .run import _has_gpu
from .timing import CudaEventTimer, HostTimer, robust


def run_torch(B, N, T, H, dtype, causal, rows):
    import torch
    import torch.nn.functional as F

    import ftattn_torch

    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, N, T, H, generator=g).to(dev, getattr(torch, dtype)).requires_grad_(True)
               for _ in range(3))
    go = torch.randn(B, N, T, H, generator=g).to(dev, getattr(torch, dtype))
    timer = CudaEventTimer(torch) if gpu else HostTimer(lambda r: None)
    impl = "triton" if gpu else "unfused"
    fns = {"F.sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}
    for scheme in ("baseline", "full"):
        fns[f"ftattn {scheme} ({impl})"] = lambda s=scheme: ftattn_torch.attention(
            q, k, v, is_causal=causal, scheme=s, implementation=impl)[0]

    def step(fn):
        def run():
            out = fn()
            torch.autograd.backward(out, go)
            for x in (q, k, v):
                x.grad = None
        return run

    for name, fn in fns.items():
        ms = robust(lambda: step(fn)(), [()], timer)["ms"]
        peak = None
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(fn)()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        rows.append(("torch", name, ms, peak))


def run_jax(B, N, T, H, dtype, causal, rows):
    import jax
    import jax.numpy as jnp

    import ftattn_jax

    gpu = _has_gpu()
    rng = np.random.default_rng(0)
    q, k, v, go = (jnp.asarray(rng.standard_normal((B, T, N, H)), dtype) for _ in range(4))
    timer = HostTimer(lambda r: jax.block_until_ready(r))
    impl = "pallas" if gpu else "unfused"

    def grad_step(f):
        def loss(q, k, v):
            return jnp.sum(f(q, k, v).astype(jnp.float32) * go.astype(jnp.float32))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    fns = {"jax.nn": grad_step(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal))}
    if gpu:
        fns["jax.nn cudnn"] = grad_step(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn"))
    for scheme in ("baseline", "full"):
        fns[f"ftattn {scheme} ({impl})"] = grad_step(lambda q, k, v, s=scheme: ftattn_jax.dot_product_attention(
            q, k, v, is_causal=causal, scheme=s, implementation=impl))
    for name, fn in fns.items():
        try:
            ms = robust(fn, [(q, k, v)], timer)["ms"]
        except Exception as e:  # noqa: BLE001 - cuDNN refuses some shapes and dtypes: say so, go on
            print(f"jax {name}: not run ({type(e).__name__}: {str(e).splitlines()[0][:90]})")
            continue
        rows.append(("jax", name, ms, None))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m compare.train", description=__doc__.splitlines()[0])
    p.add_argument("--framework", choices=("jax", "torch", "both"), default="both", help="default: %(default)s")
    for axis, gpu_default in (("B", 2), ("N", 16), ("T", 4096), ("H", 128)):
        p.add_argument(f"--{axis}", type=int, default=None, help=f"default {gpu_default} on a GPU, small on a CPU")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="default bfloat16 on a GPU, float32 elsewhere")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True, help="default: %(default)s")
    a = p.parse_args(argv)
    gpu = _has_gpu()
    B, N, T, H = (a.B or (2 if gpu else 1), a.N or (16 if gpu else 2), a.T or (4096 if gpu else 64),
                  a.H or (128 if gpu else 16))
    for name, n in (("--B", B), ("--N", N), ("--T", T), ("--H", H)):
        if n < 1:
            p.error(f"{name}: expected >= 1, got {n}")
    dtype = a.dtype or ("bfloat16" if gpu else "float32")
    rows: list = []
    if a.framework in ("torch", "both"):
        run_torch(B, N, T, H, dtype, a.causal, rows)
    if a.framework in ("jax", "both"):
        run_jax(B, N, T, H, dtype, a.causal, rows)
    print(f"forward + backward, B={B} N={N} T=S={T} H={H} {dtype} causal={a.causal}; median of 10 steps after "
          f"3 warm-ups{'' if gpu else ' (no GPU: the unfused path, host timer)'}")
    print(f"{'framework':<10}{'function':<28}{'ms':>9}{'x plain':>9}{'peak GiB':>10}")
    plain = {f: ms for f, n, ms, _ in rows if n in ("F.sdpa", "jax.nn")}
    for f, n, ms, peak in rows:
        ratio = f"{ms / plain[f]:>9.2f}" if f in plain else f"{'-':>9}"
        print(f"{f:<10}{n:<28}{ms:>9.3f}{ratio}{'' if peak is None else f'{peak:>10.2f}'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
