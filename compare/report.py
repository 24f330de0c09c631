"""``python -m compare.report <results.json or its folder>``: re-render a ``compare`` result
(the table in the terminal, ``plot.png`` and ``plot.csv`` next to the JSON) from the file
alone: ``compare.run`` and ``compare.train`` results, and files older than the schema's name.

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


if __name__ == "__main__":
    sys.exit(main())
