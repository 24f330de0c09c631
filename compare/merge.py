"""Merging the backends' results in ``python -m compare.run``: each backend's worker saves
its rows and outputs; the parent loads them, cross-checks the backends' outputs and
verdicts, and relates every row to the fastest unprotected one."""

from __future__ import annotations

import json
import os

import numpy as np

from ftattn_spec.schemes import CHECKS

from . import results
from .table import series_label


def scheme_key(scheme: str, implementation: str = "unfused") -> str:
    """A scheme row's label: the scheme, with ``[implementation]`` unless unfused."""
    return series_label({"scheme": scheme, "implementation": implementation})


def tflops(flops: float, ms: float) -> float:
    """TFLOP/s of ``flops`` floating-point operations in ``ms`` milliseconds."""
    return flops / (ms * 1e-3) / 1e12


def cross_check(rows: list[dict], outs: dict) -> None:
    """Add JAX-vs-PyTorch output differences (in units of the bound) and verdict
    agreement per check to the rows, and each row's ratio to the fastest
    unprotected row of its shape."""
    for r in rows:
        if r.get("method") == "notebook-loop-order":
            continue  # timed on fresh inputs: no output kept
        other = "torch" if r["backend"] == "jax" else "jax"
        # the twin is the other backend's unfused row (JAX's for a triton row, PyTorch's for a pallas row)
        mine = outs.get((r["backend"], r["shape"], scheme_key(r["scheme"], r.get("implementation", "unfused"))))
        theirs = outs.get((other, r["shape"], r["scheme"]))
        if mine is not None and theirs is not None:
            bound = outs[(r["backend"], r["shape"], "bound")]
            r["xbackend_vs_bound"] = float(np.max(np.abs(mine - theirs) / bound))
        twin = [x for x in rows if x["backend"] == other and x["shape"] == r["shape"] and x["scheme"] == r["scheme"]
                and x.get("method") == r.get("method") and x.get("implementation", "unfused") == "unfused"]
        if twin and "flags" in r and "flags" in twin[0]:
            # a fused kernel runs fewer checks; in CHECKS order (a JAX report's checks come sorted by name)
            common = [c for c in CHECKS if c in r["flags"] and c in twin[0]["flags"]]
            r["verdicts_agree"] = all(r["flags"][c] == twin[0]["flags"][c] for c in common)
            if len(common) < max(len(r["flags"]), len(twin[0]["flags"])):
                r["verdicts_compared"] = common
    for shape in {r["shape"] for r in rows}:
        plain = [r["ms"] for r in rows if r["shape"] == shape and (r["scheme"] == "baseline" or r.get("peer"))
                 and r["ms"] == r["ms"]]
        for r in rows:
            if r["shape"] == shape and plain:
                r["vs_fastest_unprotected"] = r["ms"] / min(plain)


def _worker_path(out_dir: str, bname: str) -> str:
    return os.path.join(out_dir, f".{bname}.npz")


def _save_worker(path: str, rows, outs, env) -> None:
    arrays = {f"{shape}|{what}": a for (shape, what), a in outs.items()}
    np.savez(path, _rows=np.array(json.dumps(results._clean(rows))), _env=np.array(json.dumps(env)), **arrays)


def _load_worker(path: str):
    with np.load(path) as z:
        rows = json.loads(str(z["_rows"]))
        env = json.loads(str(z["_env"]))
        outs = {tuple(k.split("|", 1)): z[k] for k in z.files if not k.startswith("_")}
    return results.restore_nans(rows), outs, env
