"""Clean-run calibration and detection floors: ``python -m compare.calibrate``.

For each shape of a preset, dtype, input distribution and causal setting, runs
the ``full`` scheme on fresh random inputs and prints, per check:

* ``worst``: the largest residual / threshold over all rows (must stay < 1:
  a clean run is never flagged; the smaller, the more slack the model has);
* ``flagged``: rows flagged on clean data (must be 0);
* ``floor``: the detection floor, threshold / (largest |element| of the
  checked row or column), median and maximum over rows. A single-element error
  larger than ``floor`` times the row's scale is flagged (the residual is linear
  in a single-element error, and clean residuals are far below threshold).

The checked rows are: rows and columns of S for ``qk_row``/``qk_col``, rows of P
for ``softmax_dmr``, rows of O for ``pv_row``. Large presets are cut to at most
``--max-heads`` (batch × heads): thresholds are per row and do not depend on B
or N. Results go to stdout and, with ``--json``, to a file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time

import numpy as np

from ftattn_spec.inputs import DISTRIBUTIONS, draw_qkv
from ftattn_spec.schemes import CHECKS
from ftattn_spec.shapes import PRESET_NAMES, Shape, preset

from .backends import make_backend


def calibrate_case(backend, shape, dtype: str, dist: str, is_causal: bool, seed: int) -> dict:
    qn, kn, vn = draw_qkv(seed, dist, shape.B, shape.N, shape.kv_heads, shape.T, shape.S, shape.H)
    q, k, v = (backend.array(x, dtype) for x in (qn, kn, vn))
    del qn, kn, vn
    out, report = backend.sync(backend.attention(q, k, v, scheme="full", is_causal=is_causal))
    rep = backend.numpy_report(report)
    scales = backend.row_scales(q, k, out, is_causal=is_causal)
    row = {"shape": shape.label(), "dtype": dtype, "dist": dist, "causal": is_causal,
           "detected": bool(rep.detected), "checks": {}}
    for name in CHECKS:
        c = rep.checks[name]
        live = c.threshold > 0  # causal columns no query attends have nothing to check
        ratio = c.residual[live] / c.threshold[live]
        floor = c.threshold[live] / np.maximum(scales[name][live], np.finfo(np.float32).tiny)
        row["checks"][name] = {
            "worst": float(np.max(ratio)),
            "flagged": int(c.flagged.sum()),
            "floor_median": float(np.median(floor)),
            "floor_max": float(np.max(floor)),
        }
    return row


def markdown(rows: list[dict], dist: str = "uniform", causal: bool = False) -> str:
    """Detection-floor table (median over rows) per dtype and check, one column per shape,
    plus the worst clean residual/threshold over every case in ``rows``."""
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    labels = [f"T={s.split(' T=')[1].split(' ')[0]}" for s in shapes]
    lines = ["| dtype | check | " + " | ".join(labels) + " | worst clean ratio (all cases) |",
             "|---|---|" + "---|" * (len(shapes) + 1)]
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for check in CHECKS:
            cells = []
            for shp in shapes:
                match = [r for r in rows if r["shape"] == shp and r["dtype"] == dtype and r["dist"] == dist
                         and r["causal"] == causal]
                cells.append(f"{match[0]['checks'][check]['floor_median']:.2g}" if match else "n/a")
            worst = max(r["checks"][check]["worst"] for r in rows if r["dtype"] == dtype)
            lines.append(f"| {dtype} | {check} | " + " | ".join(cells) + f" | {worst:.2g} |")
    return "\n".join(lines)


def cut(shape, max_heads: int):
    from dataclasses import replace

    B = max(1, min(shape.B, max_heads // shape.N))
    N = shape.N if shape.B * shape.N <= max_heads else max(1, min(shape.N, max_heads // B))
    K = None if shape.K is None else min(shape.K, N)
    return replace(shape, B=B, N=N, K=K)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compare.calibrate", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--backend", default="torch", choices=["jax", "torch"], help="which backend's unfused path")
    ap.add_argument("--preset", default="cpu", choices=PRESET_NAMES, help="shapes")
    ap.add_argument("--dtypes", default="float16,bfloat16,float32", help="comma-separated input dtypes")
    ap.add_argument("--dists", default=",".join(DISTRIBUTIONS), help="comma-separated input distributions")
    ap.add_argument("--causal", default="both", choices=["no", "yes", "both"], help="causal attention")
    ap.add_argument("--shape", default=None, help="B,N,T,S,H instead of a preset, e.g. 1,2,16384,16384,128")
    ap.add_argument("--max-heads", type=int, default=8, help="cap on batch x heads per shape")
    ap.add_argument("--seed", type=int, default=0, help="seed of the inputs")
    ap.add_argument("--json", default=None, help="write every row to this file")
    ap.add_argument("--markdown", default=None, metavar="JSON",
                    help="only print the detection-floor table of an earlier --json file")
    args = ap.parse_args(argv)
    for name, text, allowed in (("--dtypes", args.dtypes, ("float16", "bfloat16", "float32")),
                                ("--dists", args.dists, DISTRIBUTIONS)):
        bad = [x for x in text.split(",") if x not in allowed]
        if bad:
            ap.error(f"{name}: expected a comma-separated list of {tuple(allowed)}, got {text!r}")
    if args.shape and not re.fullmatch(r"\d+,\d+,\d+,\d+,\d+", args.shape):
        ap.error(f"--shape: expected five positive integers B,N,T,S,H, got {args.shape!r}")
    if args.max_heads < 1:
        ap.error(f"--max-heads: expected >= 1, got {args.max_heads}")
    if args.markdown:
        with open(args.markdown) as f:
            data = json.load(f)
        print(f"<!-- {data['backend']} {data['environment']} -->")
        print(markdown(data["rows"]))
        return 0

    backend = make_backend(args.backend)
    causal = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    rows = []
    print(f"# backend={args.backend} {backend.environment()} preset={args.preset}", flush=True)
    print(f"{'shape':36} {'dtype':9} {'dist':9} {'causal':6} " +
          " ".join(f"{c + ' worst/floor':>26}" for c in CHECKS), flush=True)
    if args.shape:
        shapes = (Shape(*(int(x) for x in args.shape.split(","))),)
    else:
        shapes = preset(args.preset)
    for shape, dtype, dist, is_causal in itertools.product(
            shapes, args.dtypes.split(","), args.dists.split(","), causal):
        shape = cut(shape, args.max_heads)
        t0 = time.perf_counter()
        row = calibrate_case(backend, shape, dtype, dist, is_causal, args.seed)
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        cells = " ".join(
            f"{c['worst']:9.2e}/{c['floor_median']:8.1e}{'!' if c['flagged'] else ' ':1}".rjust(26)
            for c in row["checks"].values())
        print(f"{shape.label():36} {dtype:9} {dist:9} {str(is_causal):6} {cells}", flush=True)
    bad = [r for r in rows if r["detected"]]
    print(f"# {len(rows)} cases, {len(bad)} with a clean-run flag")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": args.backend, "environment": backend.environment(), "argv": sys.argv,
                       "rows": rows}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
