"""``python -m compare.report <results.json or its folder>``: re-render a ``compare`` result
(the table in the terminal, ``plot.png`` and ``plot.csv`` next to the JSON) from the file
alone: ``compare.run`` and ``compare.train`` results, the fault campaigns' (their outcome
map), and files older than the schema's name.

Exit status: 0 when every check of the file's rows held, 1 when one did not (a detection on
clean inputs, an output beyond its bound), 2 on a usage error (no such file, not a results
file).
"""

from __future__ import annotations

import argparse
import os
import sys

from . import results
from .table import held


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compare.report", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("path", help="a results.json, or the folder that holds one")
    ap.add_argument("--no-plot", action="store_true", help="the table only")
    ap.add_argument("--wide", action="store_true", help="every column")
    args = ap.parse_args(argv)
    path = os.path.join(args.path, "results.json") if os.path.isdir(args.path) else args.path
    if not os.path.exists(path):
        ap.error(f"path: expected a results.json or a folder holding one, got {args.path!r}")
    try:
        doc = results.load(path)
    except (OSError, ValueError) as e:
        ap.error(f"path: {e}")
    if doc["command"] in FAULT_COMMANDS:
        return _fault_report(doc, path, args)
    if doc["command"] in ("kernel-bench", "pallas-bench"):  # their own rows: one line each
        print(f"# compare.{doc['command']} on {results.gpu_of(doc['environment']) or 'no GPU'}")
        for r in doc["rows"]:
            print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
        return 0
    cfg, env = doc["config"], doc["environment"]
    title = (f"compare.{doc['command']} preset={cfg.get('preset')} dtype={cfg.get('dtype')} "
             f"causal={cfg.get('causal')} method={cfg.get('method', 'robust')}")
    print(f"# {env.get('date') or (env.get('host') or {}).get('date', '')} on {results.gpu_of(env) or 'no GPU'}")
    results.render(doc["rows"], title, wide=args.wide)
    if not args.no_plot:
        out = os.path.join(os.path.dirname(path) or ".", "plot.png")
        results.plot(doc["rows"], out, title)
        print(f"wrote {out} and {out[:-4]}.csv")
    failed = [r for r in doc["rows"] if not r.get("skipped") and held(r) not in ("ok", "–")]
    return 1 if failed else 0


#: commands whose rows are an outcome map (``compare.scorecard.outcome_table``), and its plot's name
FAULT_COMMANDS = {"faults": "faults.png", "backward-faults": "backward_faults.png"}


def _fault_report(doc: dict, path: str, args) -> int:
    """A fault campaign's file: per backend, dtype and site the outcome counts, misses with their
    95% bound; the outcome map and its CSV again; the exit status the campaign had."""
    from . import scorecard

    rows = doc["rows"]
    cats = scorecard.OUTCOMES if any("below_limit" in r for r in rows) else scorecard.BACKWARD_OUTCOMES
    env = doc["environment"]
    print(f"# compare.{doc['command']} {env.get('date', '')} on {results.gpu_of(env) or 'no GPU'}")
    sums: dict = {}
    for r in rows:
        acc = sums.setdefault((r["backend"], r["dtype"], r["site"]), dict.fromkeys(cats, 0))
        for c in cats:
            acc[c] += int(r.get(c) or 0)
    for (backend, dtype, site), acc in sums.items():
        counts = " ".join(f"{c} {acc[c]}" for c in cats)
        print(f"{backend:6s} {dtype:9s} {site:14s} {counts}; "
              f"{scorecard.bound_text(acc['missed'], scorecard.mattered(acc))}")
    if not args.no_plot and rows:
        _, png = scorecard.save_outcomes(rows, os.path.dirname(path) or ".", FAULT_COMMANDS[doc["command"]], cats)
        print(f"wrote {png} and outcomes.csv")
    return int(doc.get("exit_status") or 0)


if __name__ == "__main__":
    sys.exit(main())
