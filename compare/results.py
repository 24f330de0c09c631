"""Results of ``compare.run`` as JSON, and their table and plot.

``python -m compare.report results/<run>/results.json`` re-renders both from the
JSON alone.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys


def host_environment() -> dict:
    """Date, command line, Python, and the GPU driver if ``nvidia-smi`` answers."""
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "command": " ".join([sys.executable.split("/")[-1], "-m", "compare.run", *sys.argv[1:]]),
           "python": platform.python_version(), "machine": platform.machine()}
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
            if out:
                env["gpu"], env["driver"] = (x.strip() for x in out[0].split(",", 1))
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no NaN; a missing measurement is null
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def output_folder(path: str, flag: str = "--out") -> str:
    """Create ``path`` (a folder) and prove it writable, before any work is done.

    Raises ``SystemExit`` with one line naming ``flag`` when ``path`` is a file,
    cannot be created, or cannot be written (a read-only or virtual file system
    such as ``/proc``).
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise SystemExit(f"{flag}: expected a folder, got {path!r}, which is an existing file")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("")
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"{flag}: expected a folder that can be created and written, got {path!r} "
                         f"({e.strerror or type(e).__name__})") from None
    return path


def save(path: str, doc: dict) -> None:
    with open(path, "w") as f:
        json.dump(_clean(doc), f, indent=1)


def load(path: str) -> dict:
    """Read a ``compare.run`` results file; ``ValueError`` (naming the file) if it
    is not JSON or not such a file."""
    with open(path) as f:
        try:
            doc = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: expected a compare.run results file (JSON), got text that is not "
                             f"JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a compare.run results file (a JSON object), got a JSON "
                         f"{type(doc).__name__}")
    for key in ("config", "environment", "rows"):
        if key not in doc:
            raise ValueError(f"{path}: expected a compare.run results file with {key!r}, got keys {sorted(doc)}")
    restore_nans(doc["rows"])
    return doc


def restore_nans(rows: list[dict]) -> list[dict]:
    """Undo :func:`_clean`: a missing measurement (null) is NaN again."""
    for r in rows:
        for k, v in r.items():
            if v is None and k not in ("flags", "skipped"):
                r[k] = float("nan")
    return rows


def _fmt(x, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def series_label(r: dict) -> str:
    """A row's scheme, with ``[implementation]`` when it is not the unfused one (``full [triton]``)."""
    impl = r.get("implementation", "unfused")
    return r["scheme"] if impl == "unfused" else f"{r['scheme']} [{impl}]"


def render(rows: list[dict], title: str = "") -> None:
    head = ["shape", "scheme", "backend", "ms", "first call ms", "TFLOP/s", "overhead", "vs fastest", "err/bound",
            "jax-torch/bound", "verdicts agree", "detected"]
    cells = []
    for r in rows:
        ms = "OOM" if r.get("oom") else ("skipped" if r.get("skipped") else _fmt(r["ms"], ".3f"))
        over = r.get("overhead")
        fastest = r.get("vs_fastest_unprotected")
        label = series_label(r) + (" (peer)" if r.get("peer") else "")
        if r.get("method") == "notebook-loop-order":
            label += " (loop order)"
        cells.append([r["shape"], label, r["backend"], ms, _fmt(r.get("first_call_ms"), ".0f"),
                      _fmt(r.get("tflops"), ".2f"),
                      "–" if over is None or over != over else f"{100 * over:+.0f}%",
                      "–" if fastest is None or fastest != fastest else f"{fastest:.2f}x",
                      _fmt(r.get("err_vs_bound"), ".3f"), _fmt(r.get("xbackend_vs_bound"), ".3f"),
                      str(r.get("verdicts_agree", "–")),
                      "–" if r.get("peer") or r.get("skipped") else str(r.get("detected"))])
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        t = Table(*head, title=title or None)
        for c in cells:
            t.add_row(*(escape(x) for x in c))  # "full [triton]" is a label, not markup
        Console(width=max(150, Console().width)).print(t)
    except ImportError:
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
        print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        for c in cells:
            print("  ".join(x.ljust(w) for x, w in zip(c, widths)))


def plot(rows: list[dict], path: str, title: str = "") -> None:
    """TFLOP/s against sequence length, one line per scheme and backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    series = sorted({(series_label(r), r["backend"]) for r in rows})
    for scheme, backend in series:
        pts = sorted((r["T"], r["tflops"]) for r in rows
                     if series_label(r) == scheme and r["backend"] == backend and r.get("tflops") == r.get("tflops"))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    linestyle="-" if backend == "jax" else "--", label=f"{scheme} · {backend}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length T (= S)")
    ax.set_ylabel("TFLOP/s (4·B·N·T·S·H, halved when causal)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
