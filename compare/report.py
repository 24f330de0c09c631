"""``python -m compare.report results/<run>/``: re-render a ``compare.run`` result
(the table in the terminal, and ``plot.png`` next to the JSON) from its JSON alone."""

from __future__ import annotations

import argparse
import os
import sys

from . import results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compare.report", description=__doc__.split("\n")[0])
    ap.add_argument("path", help="a results.json, or the folder that holds one")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    path = os.path.join(args.path, "results.json") if os.path.isdir(args.path) else args.path
    if not os.path.exists(path):
        raise SystemExit(f"path: expected a results.json or a folder holding one, got {args.path!r}")
    try:
        doc = results.load(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"path: {e}") from None
    cfg = doc["config"]
    title = f"preset={cfg.get('preset')} dtype={cfg.get('dtype')} causal={cfg.get('causal')} method={cfg.get('method')}"
    print(f"# {doc['environment'].get('date', '')} {doc['environment'].get('gpu', 'no GPU')}  {title}")
    results.render(doc["rows"], title)
    if not args.no_plot:
        out = os.path.join(os.path.dirname(path) or ".", "plot.png")
        results.plot(doc["rows"], out, title)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
