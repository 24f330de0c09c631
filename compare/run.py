"""``python -m compare.run``: run every scheme in both backends, time it, cross-check it.

This is the foundation's version of the comparison (issue 5 adds the peer
kernels, JSON, plots and subprocess isolation). For each shape of a preset,
each scheme and each backend it reports:

* the median time of the call after warm-up (JAX: ``block_until_ready``;
  PyTorch: CUDA events on a GPU, a host clock on the CPU), rotating input sets;
* TFLOP/s (4·B·N·T·S·H, halved when causal) and overhead against the same
  backend's ``baseline``;
* the largest output error against a float64 NumPy reference on a subsample
  (batch 0, first heads), in units of the spec's error bound (must be ≤ 1);
* the largest JAX-vs-PyTorch output difference in the same units (≤ 2);
* whether any check fired (clean inputs: must be ``False`` everywhere).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from ftattn_spec import reference as ref
from ftattn_spec.inputs import DISTRIBUTIONS, draw_qkv
from ftattn_spec.schemes import SCHEME_NAMES
from ftattn_spec.shapes import PRESET_NAMES, preset

from .backends import make_backend

SUBSAMPLE_HEADS = 2


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        pass
    try:
        import jax

        return jax.default_backend() == "gpu"
    except ImportError:
        return False


def _heads(backend, x, n: int) -> np.ndarray:
    """Batch 0 and the first ``n`` heads of a backend array, as logical float64."""
    return backend.logical(x[:1, :, :n] if backend.name == "jax" else x[:1, :n])


def _is_oom(e: Exception) -> bool:
    text = f"{type(e).__name__} {e}"
    return "OutOfMemory" in text or "RESOURCE_EXHAUSTED" in text or "out of memory" in text


def _free(backend) -> None:
    import gc

    gc.collect()
    if backend.name == "torch" and backend.device.type == "cuda":
        backend.torch.cuda.empty_cache()


def time_call(backend, fn, inputs, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn(*inputs[i % len(inputs)])`` after ``warmup`` calls."""
    for i in range(warmup):
        backend.sync(fn(*inputs[i % len(inputs)]))
    times = []
    if backend.name == "torch" and backend.device.type == "cuda":
        torch = backend.torch
        for i in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*inputs[i % len(inputs)])
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for i in range(reps):
            t0 = time.perf_counter()
            backend.sync(fn(*inputs[i % len(inputs)]))
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(args) -> list[dict]:
    """All shapes of one backend, then the next, so that each backend has the
    device memory to itself; outputs are kept on a subsample for the
    cross-backend comparison."""
    rows, outs, bounds = [], {}, {}
    shapes = preset(args.preset)
    for bname in args.backends.split(","):
        try:
            be = make_backend(bname)
        except ImportError as e:
            print(f"skipping backend {bname}: {e.name or e} is not installed", flush=True)
            continue
        for shape in shapes:
            host = [draw_qkv(args.seed + i, args.dist, shape.B, shape.N, shape.kv_heads, shape.T, shape.S,
                             shape.H) for i in range(args.input_sets)]
            inputs = [tuple(be.array(x, args.dtype) for x in qkv) for qkv in host]
            del host
            # float64 reference on a subsample: batch 0, the first heads (and their kv heads)
            nh = min(SUBSAMPLE_HEADS, shape.N)
            nk = -(-nh // (shape.N // shape.kv_heads))
            q0, k0, v0 = inputs[0]
            q, k, v = _heads(be, q0, nh), _heads(be, k0, nk), _heads(be, v0, nk)
            o64, p, _ = ref.attention(q, k, v, is_causal=args.causal, layout="torch")
            bound = ref.output_bound(q, k, v, p, o64, dtype=args.dtype, is_causal=args.causal, layout="torch")
            bounds.setdefault(shape.label(), bound)
            base_ms = None
            for scheme in args.schemes.split(","):
                fn = lambda q, k, v, s=scheme: be.attention(q, k, v, scheme=s, is_causal=args.causal)  # noqa: E731
                row = {"shape": shape.label(), "scheme": scheme, "backend": bname}
                try:
                    ms = time_call(be, fn, inputs, args.warmup, args.reps)
                    out, rep = be.sync(fn(*inputs[0]))
                except Exception as e:  # noqa: BLE001 - only out-of-memory is expected here
                    if not _is_oom(e):
                        raise
                    print(f"{shape.label()} {scheme} {bname}: out of device memory", flush=True)
                    rows.append(dict(row, ms=float("nan"), tflops=float("nan"), overhead=float("nan"),
                                     err_vs_bound=float("nan"), detected=False, oom=True))
                    _free(be)
                    continue
                o = be.logical(out)[:1, :nh]
                outs[(shape.label(), scheme, bname)] = o
                base_ms = ms if scheme == "baseline" else base_ms
                rows.append(dict(
                    row, ms=ms, tflops=shape.flops(args.causal) / ms / 1e9,
                    overhead=(ms / base_ms - 1.0) if base_ms else float("nan"),
                    err_vs_bound=float(np.max(np.abs(o - o64) / bound)),
                    detected=bool(np.asarray(be.numpy_report(rep).detected))))
                del out, rep
            del inputs
            _free(be)
    for r in rows:
        other = "torch" if r["backend"] == "jax" else "jax"
        mine, theirs = outs.get((r["shape"], r["scheme"], r["backend"])), outs.get((r["shape"], r["scheme"], other))
        if mine is not None and theirs is not None:
            r["xbackend_vs_bound"] = float(np.max(np.abs(mine - theirs) / bounds[r["shape"]]))
    return rows


def render(rows: list[dict]) -> None:
    head = ["shape", "scheme", "backend", "ms", "TFLOP/s", "overhead", "err/bound", "jax-torch/bound", "detected"]
    cells = [[r["shape"], r["scheme"], r["backend"], "OOM" if r.get("oom") else f"{r['ms']:.3f}",
              f"{r['tflops']:.2f}",
              "-" if r["scheme"] == "baseline" else f"{100 * r['overhead']:+.0f}%",
              f"{r['err_vs_bound']:.3f}", f"{r.get('xbackend_vs_bound', float('nan')):.3f}",
              str(r["detected"])] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(*head)
        for c in cells:
            t.add_row(*c)
        Console(width=max(140, Console().width)).print(t)
    except ImportError:
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
        print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        for c in cells:
            print("  ".join(x.ljust(w) for x, w in zip(c, widths)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compare.run", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default=None, choices=PRESET_NAMES, help="default: seed on a GPU, cpu otherwise")
    ap.add_argument("--schemes", default=",".join(SCHEME_NAMES))
    ap.add_argument("--backends", default="jax,torch")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--dist", default="uniform", choices=DISTRIBUTIONS)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--input-sets", type=int, default=3, help="rotate this many input sets while timing")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    # Both frameworks share one GPU here: stop JAX from taking 75% of it up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.preset is None:
        args.preset = "seed" if _has_gpu() else "cpu"
    if "baseline" in args.schemes.split(","):
        args.schemes = ",".join(["baseline"] + [s for s in args.schemes.split(",") if s != "baseline"])
    print(f"# preset={args.preset} dtype={args.dtype} dist={args.dist} causal={args.causal}", flush=True)
    rows = run(args)
    render(rows)
    bad = [r for r in rows if r["detected"] or r["err_vs_bound"] > 1 or r.get("xbackend_vs_bound", 0) > 2]
    print(f"# {len(rows)} rows; {len(bad)} with a false positive or an output outside its bound")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
