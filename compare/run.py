"""``python -m compare.run``: run every scheme in both backends, time it, cross-check it.

For each shape of a preset, each scheme and each backend it reports:

* the median time of the call after warm-up (JAX: ``block_until_ready``;
  PyTorch: CUDA events on a GPU, a host clock on the CPU), rotating input sets
  (``--method notebook``: the seed notebook's ten calls between two events, no
  warm-up, plus its loop-order method for ``baseline``; see ``compare.timing``),
  and the first call's time on its own (JAX compiles then);
* TFLOP/s (4·B·N·T·S·H, halved when causal) and overhead against the same
  backend's ``baseline``;
* the largest output error against a float64 NumPy reference on a subsample
  (batch 0, first heads), in units of the spec's error bound (must be ≤ 1);
* the largest JAX-vs-PyTorch output difference in the same units (≤ 2);
* whether any check fired (clean inputs: must be ``False`` everywhere), and
  whether the two backends' verdicts agree per check;
* the ratio to the fastest unprotected row of the same shape.

Each backend runs in its own process when more than one runs (``--isolate``),
so that neither framework's allocator holds memory the other needs; the
result is the same either way. Writes ``results.json`` (every row, the
configuration, the environment) and ``plot.png`` under ``--out``;
``python -m compare.report`` re-renders them. The peers (``compare.peers``:
SDPA with each backend, ``jax.nn.dot_product_attention`` with XLA and cuDNN)
are timed in the same run; one that cannot run here is skipped with its reason.

``--implementations`` (default ``unfused,triton,pallas``) picks what each
backend's scheme rows run: ``unfused`` in both; ``triton`` (PyTorch only: the
fused Triton kernel, ``attention(..., implementation="triton")``) and
``pallas`` (JAX only: the fused Pallas kernel, ``attention(...,
implementation="pallas")``: the Hopper kernel on sm_90 GPUs for head dims 64
and 128, the portable one otherwise) for every scheme they can run, each with its own
``baseline`` (the kernel without checks) for the overhead. Fused rows are
labelled ``<scheme> [triton]`` or ``<scheme> [pallas]`` (``"implementation"``
in the JSON rows), need a GPU (without one they are skipped with the reason
``triton: no GPU`` or ``pallas: no GPU``: an interpreted kernel's time means
nothing), and skip ``abft_qk_col``, whose column check the kernels do not
run. Each is cross-checked against the other backend's unfused rows (triton
against JAX's, pallas against PyTorch's), on the checks both run.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time

import numpy as np

from ftattn_spec import reference as ref
from ftattn_spec.inputs import draw_qkv
from ftattn_spec.schemes import SCHEMES
from ftattn_spec.shapes import preset
from ftattn_spec.implementations import run_checks as implementation_checks

from . import peers, results, timing
from .run_options import FUSED, forward as _forward, has_gpu as _has_gpu, parser, validate as _validate  # noqa: F401
from .table import held
from .merge import _load_worker, _save_worker, _worker_path, cross_check, scheme_key, tflops  # noqa: F401
from .backends import IMPLEMENTATIONS, make_backend

SUBSAMPLE_HEADS = 2
#: Run Triton's interpreter on the CPU instead of skipping (tests only: slow, and
#: TRITON_INTERPRET=1 must have been set before triton was imported).
TRITON_ON_CPU = False
#: Run the Pallas kernel in interpret mode on the CPU instead of skipping (tests only).
PALLAS_ON_CPU = False

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


def _implementations(args, bname: str) -> list[str]:
    """The implementations of ``--implementations`` that backend ``bname`` offers, in that order."""
    return [i for i in dict.fromkeys(args.implementations.split(",")) if i in IMPLEMENTATIONS[bname]]


def _skip_reason(be, scheme: str, implementation: str) -> str | None:
    """Why ``implementation`` cannot run ``scheme`` on this backend here (None: it can try)."""
    if implementation not in FUSED:
        return None
    try:
        implementation_checks(implementation, scheme)
    except ValueError:
        return (f"{implementation}: runs none of the checks of {scheme} ({', '.join(SCHEMES[scheme].checks)}); "
                f"unfused only")
    if implementation == "triton":
        if be.device.type != "cuda" and not TRITON_ON_CPU:
            return "triton: no GPU"
        if not _installed("triton"):
            return "triton: not installed"
    elif be.interpreted() and not PALLAS_ON_CPU:  # pallas without a GPU: Pallas' interpret mode
        return "pallas: no GPU"
    return None


def _timed(args, be, fn, inputs) -> dict:
    """The framework's protocol (``compare.timing.measure``), or the notebook's methods."""
    if args.method == "notebook":
        return timing.notebook(fn, inputs, timing.timer_for(be))
    return timing.measure(fn, inputs, backend_name=be.name, on_gpu=_on_gpu(be), sync=be.sync,
                          torch=getattr(be, "torch", None), warmup=args.warmup, reps=args.reps)


def _timing_fields(timed: dict) -> dict:
    """What a row keeps of a measurement besides the median: the spread and how it was taken."""
    return {k: timed[k] for k in ("times_ms", "iqr_ms", "dispatch_ms", "protocol") if k in timed}


def run_backend(args, bname: str, progress=None):
    """Every shape and scheme of one backend. Returns ``(rows, subsamples)``:
    ``subsamples[(shape, scheme)]`` is the output on batch 0 and the first heads,
    and ``subsamples[(shape, "bound")]`` the spec's error bound there."""
    rows, outs, said = [], {}, set()
    be = make_backend(bname)
    if not _implementations(args, bname):
        print(f"{bname}: none of --implementations {args.implementations} (it has {IMPLEMENTATIONS[bname]}); "
              f"peers only", flush=True)
    for shape in preset(args.preset):
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
        outs[(shape.label(), "bound")] = bound
        for impl in _implementations(args, bname):
            base_ms = None
            for scheme in args.schemes.split(","):
                row, o, base_ms = _scheme_row(args, be, shape, inputs, scheme, impl, base_ms, nh, o64, bound)
                rows.append(row)
                if row.get("skipped") and row["skipped"] not in said:  # each reason once
                    said.add(row["skipped"])
                    print(f"{bname} {impl} rows skipped: {row['skipped']}", flush=True)
                if o is not None:
                    outs[(shape.label(), scheme_key(scheme, impl))] = o
                if progress:
                    progress()
        if args.peers:
            rows += _peer_rows(args, be, shape, inputs, nh, o64, bound, progress, said)
        del inputs
        _free(be)
    if args.method == "notebook" and "baseline" in args.schemes.split(","):
        rows += loop_order_rows(args, be)
    return rows, outs, be.environment()


def _scheme_row(args, be, shape, inputs, scheme: str, impl: str, base_ms, nh: int, o64, bound):
    """Time one scheme under one implementation. Returns ``(row, subsample output or None, base_ms)``:
    ``base_ms`` is the time of this implementation's ``baseline`` once measured."""
    kw = {} if impl == "unfused" else {"implementation": impl}
    if be.name == "jax":  # under jax.jit, as users call it and as the jax.nn peers are timed
        fn = be.jitted(scheme=scheme, is_causal=args.causal, **kw)
    else:
        fn = lambda q, k, v, s=scheme: be.attention(q, k, v, scheme=s, is_causal=args.causal, **kw)  # noqa: E731
    row = {"shape": shape.label(), "T": shape.T, "S": shape.S, "scheme": scheme, "backend": be.name,
           "method": args.method, "flops": shape.flops(args.causal), "implementation": impl}
    if impl == "pallas":  # which of the two Pallas kernels this row times
        row["lowering"] = be.lowering(inputs[0][0], scheme)
    missing = dict(ms=float("nan"), tflops=float("nan"), overhead=float("nan"), err_vs_bound=float("nan"),
                   detected=False)
    label = f"{shape.label()} {scheme_key(scheme, impl)} {be.name}"
    reason = _skip_reason(be, scheme, impl)
    if reason:
        return dict(row, **missing, skipped=reason), None, base_ms
    try:
        t0 = time.perf_counter()
        try:
            out, rep = be.sync(fn(*inputs[0]))  # first call: compiles in JAX (and Triton)
        except (ValueError, TypeError) as e:
            if impl == "unfused" or impl not in str(e):
                raise
            # what the kernel does not support (dtype, head dim): its message names it and says which
            reason = f"{impl}: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}"
            return dict(row, **missing, skipped=reason), None, base_ms
        first_ms = (time.perf_counter() - t0) * 1e3
        timed = _timed(args, be, fn, inputs)
    except Exception as e:  # noqa: BLE001 - only out-of-memory is expected here
        if not _is_oom(e):
            raise
        print(f"{label}: out of device memory, row skipped", flush=True)
        _free(be)
        return dict(row, **missing, oom=True), None, base_ms
    ms = timed["ms"]
    o = be.logical(out)[:1, :nh]
    base_ms = ms if scheme == "baseline" else base_ms
    report = be.numpy_report(rep)
    row = dict(row, **_timing_fields(timed), ms=ms, first_call_ms=first_ms, tflops=tflops(shape.flops(args.causal), ms),
               overhead=(ms / base_ms - 1.0) if base_ms else float("nan"),
               err_vs_bound=float(np.max(np.abs(o - o64) / bound)),
               detected=bool(np.asarray(report.detected)),
               flags={n: bool(np.asarray(c.flagged).any()) for n, c in report.checks.items()})
    return row, o, base_ms


def loop_order_rows(args, be) -> list[dict]:
    """The notebook's "change the loop order" cell for ``baseline``: ten iterations
    of an inner loop over the preset's shapes, fresh inputs for every call, one
    event pair per call; the mean per shape."""
    shapes = {s.label(): s for s in preset(args.preset)}
    fns = {label: (lambda q, k, v: be.attention(q, k, v, scheme="baseline", is_causal=args.causal))
           for label in shapes}
    draws = iter(range(10**9))

    def make_inputs(label):
        s = shapes[label]
        qkv = draw_qkv(args.seed + 1000 + next(draws), args.dist, s.B, s.N, s.kv_heads, s.T, s.S, s.H)
        return tuple(be.array(x, args.dtype) for x in qkv)

    base = {"scheme": "baseline", "backend": be.name, "method": "notebook-loop-order"}
    try:
        means = timing.notebook_loop_order(fns, make_inputs, timing.timer_for(be))
    except Exception as e:  # noqa: BLE001 - only out-of-memory is expected here
        if not _is_oom(e):
            raise
        print(f"{be.name}: loop-order timing ran out of device memory, rows skipped", flush=True)
        _free(be)
        return []
    return [dict(base, shape=label, T=s.T, S=s.S, flops=s.flops(args.causal), ms=means[label],
                 tflops=tflops(s.flops(args.causal), means[label]), overhead=float("nan"),
                 err_vs_bound=float("nan"), detected=False) for label, s in shapes.items()]


def _on_gpu(be) -> bool:
    return be.device.type == "cuda" if be.name == "torch" else not be.interpreted()


def _peer_rows(args, be, shape, inputs, nh, o64, bound, progress, said=None) -> list[dict]:
    said = set() if said is None else said
    out_rows = []
    for name, peer in peers.peers_for(be).items():
        fn = lambda q, k, v, p=peer: p(q, k, v, args.causal)  # noqa: E731
        row = {"shape": shape.label(), "T": shape.T, "S": shape.S, "scheme": name, "backend": be.name,
               "method": args.method, "flops": shape.flops(args.causal), "peer": True, "detected": False}
        try:
            out = be.sync(fn(*inputs[0]))
            timed = _timed(args, be, fn, inputs)
        except Exception as e:  # noqa: BLE001 - a peer that cannot run here is skipped, with the reason
            reason = peers.skip_reason(name, e, on_gpu=_on_gpu(be))
            if reason not in said:
                said.add(reason)
                print(f"{be.name} peer {name}: skipped ({reason})", flush=True)
            out_rows.append(dict(row, ms=float("nan"), tflops=float("nan"), overhead=float("nan"),
                                 err_vs_bound=float("nan"), skipped=reason, oom=_is_oom(e)))
            _free(be)
            if progress:
                progress()
            continue
        o = be.logical(out)[:1, :nh]
        out_rows.append(dict(row, **_timing_fields(timed), ms=timed["ms"],
                             tflops=tflops(shape.flops(args.causal), timed["ms"]),
                             overhead=float("nan"), err_vs_bound=float(np.max(np.abs(o - o64) / bound))))
        if progress:
            progress()
    return out_rows


def _installed(bname: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(bname) is not None


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    _validate(args, ap)
    if args.dtype is None:
        args.dtype = "float16" if _has_gpu() else "float32"
    # Both frameworks may share one GPU: stop JAX from taking 75% of it up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.worker:  # a child process: one backend, results to a file
        rows, outs, env = _run_with_progress(args, args.worker)
        _save_worker(_worker_path(args.out, args.worker), rows, outs, env)
        return 0
    if args.preset is None:
        args.preset = "seed" if _has_gpu() else "cpu"
    names = [b for b in args.backends.split(",")]
    if "baseline" in args.schemes.split(","):
        args.schemes = ",".join(["baseline"] + [s for s in args.schemes.split(",") if s != "baseline"])
    try:
        args.out = results.output_folder(
            args.out or os.path.join("results", datetime.datetime.now().strftime("%Y%m%d-%H%M%S")))
    except SystemExit as e:  # a folder that cannot be written is a usage error (status 2)
        ap.error(str(e.code))
    isolate = args.isolate == "process" or (args.isolate == "auto" and len(names) > 1)
    print(f"# preset={args.preset} dtype={args.dtype} dist={args.dist} causal={args.causal} method={args.method} "
          f"implementations={args.implementations} isolate={'process' if isolate else 'none'} out={args.out}",
          flush=True)
    rows, outs, env = [], {}, {}
    for bname in names:
        if not _installed(bname):
            print(f"skipping backend {bname}: {bname} is not installed", flush=True)
            continue
        if isolate:
            cmd = [sys.executable, "-m", "compare.run", *_forward(argv if argv is not None else sys.argv[1:]),
                   "--worker", bname, "--out", args.out, "--preset", args.preset, "--schemes", args.schemes]
            done = subprocess.run(cmd)
            if done.returncode != 0:
                print(f"backend {bname}: its process failed (exit {done.returncode}); its rows are missing",
                      flush=True)
                continue
            brows, bouts, benv = _load_worker(_worker_path(args.out, bname))
            os.remove(_worker_path(args.out, bname))
        else:
            brows, bouts, benv = _run_with_progress(args, bname)
        rows += brows
        outs.update({(bname, *k): v for k, v in bouts.items()})
        env[bname] = benv
    cross_check(rows, outs)
    if args.train:
        rows += _train_rows(args, names)
    title = f"preset={args.preset} dtype={args.dtype} causal={args.causal} method={args.method}"
    results.render(rows, title, wide=args.wide)
    doc = results.document("run", {k: v for k, v in vars(args).items() if k != "worker"}, env, rows)
    results.save(os.path.join(args.out, "results.json"), doc)
    if rows:
        results.plot(rows, os.path.join(args.out, "plot.png"), title)
    bad = [r for r in rows if not r.get("peer") and not r.get("skipped") and held(r) != "ok"]  # peers: reported
    print(f"# {len(rows)} rows; {len(bad)} with a false positive or an output outside its bound; "
          f"wrote {args.out}/results.json, plot.png and plot.csv")
    return 1 if bad else 0


def _train_rows(args, names) -> list[dict]:
    """``compare.train``'s rows (forward plus backward, peak memory) at each shape of the preset,
    in this process after the backends' own (the frameworks run one after the other)."""
    from . import train

    rows: list[dict] = []
    for shape in preset(args.preset):
        for name, fn in (("torch", train.run_torch), ("jax", train.run_jax)):
            if name in names and _installed(name):
                fn(shape.B, shape.N, shape.T, shape.H, args.dtype, args.causal, rows, args.reps, args.warmup)
    train.relate(rows)
    return rows


def _run_with_progress(args, bname: str):
    n_peers = len(peers.TORCH_PEERS if bname == "torch" else peers.JAX_PEERS) if args.peers else 0
    n_schemes = len(args.schemes.split(",")) * len(_implementations(args, bname))
    steps = len(preset(args.preset)) * (n_schemes + n_peers)
    try:
        from rich.progress import Progress
    except ImportError:
        Progress = None
    if Progress is None or not sys.stderr.isatty():  # a log file: one line per step, with the time so far
        start, done = time.perf_counter(), [0]

        def line():
            done[0] += 1
            print(f"{bname}: step {done[0]}/{steps}, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        return run_backend(args, bname, progress=line)
    with Progress(transient=True) as bar:
        task = bar.add_task(f"{bname}", total=steps)
        return run_backend(args, bname, progress=lambda: bar.advance(task))


if __name__ == "__main__":
    sys.exit(main())
