"""The plot of ``compare`` timing results, and the CSV beside it.

It answers the engineer's question, "what does protection cost here?": time relative to
the fastest unprotected row of the same shape (a peer such as SDPA or ``jax.nn``, or a
``baseline``), by sequence length. One panel per backend and implementation (PyTorch
unfused, PyTorch ``triton``, JAX unfused, JAX ``pallas``; training rows get panels of their
own), one line per scheme, so that a panel has at most as many lines as there are schemes
and a scheme keeps its colour in every panel. :func:`relative_series` builds the data that
is drawn and written, so tests check it without reading pixels.
"""

from __future__ import annotations

import csv
import math

from .table import series_label

#: a scheme's colour in every panel (tab10 has ten; there are at most eight schemes)
_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
            "tab:olive", "tab:cyan")


def panel_of(r: dict) -> str:
    """``"<backend> <implementation>"``, plus ``" (fwd+bwd)"`` for training rows."""
    impl = r.get("implementation") or "unfused"
    return f"{r.get('backend', '?')} {impl}" + (f" ({r['pass']})" if r.get("pass") else "")


def relative_series(rows: list[dict]) -> dict[str, dict[str, list[tuple[int, float, str]]]]:
    """``{panel: {scheme: [(T, time / fastest unprotected, shape), ...]}}``, sorted by T, for
    the timed protected-or-baseline rows (peers are the reference, not series)."""
    out: dict[str, dict[str, list]] = {}
    for r in rows:
        ratio = r.get("vs_fastest_unprotected")
        if r.get("peer") or r.get("skipped") or ratio is None or not math.isfinite(ratio):
            continue
        if r.get("method") == "notebook-loop-order":
            continue
        out.setdefault(panel_of(r), {}).setdefault(r["scheme"], []).append((int(r["T"]), float(ratio), r["shape"]))
    for panel in out.values():
        for pts in panel.values():
            pts.sort()
    return out


def write_csv(rows: list[dict], path: str) -> None:
    """Every timed row with its ratio: what the plot draws, and the peers it is relative to."""
    fields = ["panel", "scheme", "label", "backend", "implementation", "pass", "shape", "T", "S", "ms",
              "vs_fastest_unprotected", "peer"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            if r.get("skipped") or r.get("ms") is None or r["ms"] != r["ms"]:
                continue
            w.writerow({"panel": panel_of(r), "scheme": r["scheme"], "label": series_label(r),
                        "backend": r.get("backend"), "implementation": r.get("implementation") or "unfused",
                        "pass": r.get("pass", "fwd"), "shape": r["shape"], "T": r.get("T"), "S": r.get("S"),
                        "ms": r["ms"], "vs_fastest_unprotected": r.get("vs_fastest_unprotected"),
                        "peer": bool(r.get("peer"))})


def plot(rows: list[dict], path: str, title: str = "") -> str | None:
    """Draw :func:`relative_series` to ``path`` (PNG) and write ``<path minus .png>.csv``;
    returns the CSV's path, or None when nothing was timed."""
    series = relative_series(rows)
    csv_path = path.rsplit(".", 1)[0] + ".csv"
    write_csv(rows, csv_path)
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schemes = sorted({s for panel in series.values() for s in panel})
    colour = {s: _COLOURS[i % len(_COLOURS)] for i, s in enumerate(schemes)}
    panels = sorted(series)
    ncol = min(2, len(panels))
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol, 3.8 * nrow), squeeze=False, sharey=True)
    for ax, name in zip(axes.flat, panels):
        for scheme, pts in sorted(series[name].items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colour[scheme], label=scheme)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
        ax.set_xscale("log", base=2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("sequence length T")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("time / fastest unprotected")
    fig.suptitle(title or "time relative to the fastest unprotected attention of each shape", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return csv_path
