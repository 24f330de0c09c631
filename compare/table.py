"""The terminal table of ``compare`` results: it fits the terminal.

By default one block per shape (a heading line, then one line per row) with six columns:
the scheme (``[implementation]`` unless unfused; peers marked), the backend, the median
time, × the fastest unprotected row of the shape, the overhead over the same
implementation's ``baseline``, and whether every check held. ``wide=True`` adds the rest
(first call, TFLOP/s, the spread, the output error and the cross-backend difference, verdict
agreement). Skipped rows are not drawn one by one: one line per reason says how many and
which. The widest column (the scheme) gives way when the terminal is narrow, so that no
line is wider than ``width`` (default: the terminal's, ``COLUMNS`` included).
"""

from __future__ import annotations

import math
import shutil
import textwrap

MIN_LABEL = 10


def _fmt(x, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def series_label(r: dict) -> str:
    """A row's scheme, with ``[implementation]`` when it is not the unfused one (``full [triton]``)."""
    impl = r.get("implementation", "unfused")
    return r["scheme"] if impl in ("unfused", None) else f"{r['scheme']} [{impl}]"


def held(r: dict) -> str:
    """Did every check hold for this row? ``ok``; otherwise what failed: ``flagged`` (a
    detection on clean inputs), ``error`` (output beyond its bound), ``backends`` (JAX and
    PyTorch differ by more than twice the bound). Peers are not judged (``–``)."""
    if r.get("peer"):
        return "–"
    bad = []
    if r.get("detected"):
        bad.append("flagged")
    err = r.get("err_vs_bound")
    if err is not None and err == err and err > 1:
        bad.append("error")
    x = r.get("xbackend_vs_bound")
    if x is not None and x == x and x > 2:
        bad.append("backends")
    return ",".join(bad) or "ok"


def _cells(r: dict, wide: bool) -> list[str]:
    over, fastest = r.get("overhead"), r.get("vs_fastest_unprotected")
    label = series_label(r) + (" (peer)" if r.get("peer") else "")
    if r.get("method") == "notebook-loop-order":
        label += " (loop order)"
    ms = "OOM" if r.get("oom") else _fmt(r.get("ms"), ".3f")
    out = [label, r.get("backend", "–"), ms,
           "–" if fastest is None or fastest != fastest else f"{fastest:.2f}x",
           "–" if over is None or over != over else f"{100 * over:+.0f}%", held(r)]
    if wide:
        iqr = r.get("iqr_ms")
        out += [_fmt(r.get("first_call_ms"), ".0f"), _fmt(r.get("tflops"), ".2f"),
                "–" if not iqr or any(v is None or v != v for v in iqr) else f"{iqr[0]:.3f}–{iqr[1]:.3f}",
                _fmt(r.get("peak_gib"), ".2f"), _fmt(r.get("err_vs_bound"), ".3f"),
                _fmt(r.get("xbackend_vs_bound"), ".3f"), str(r.get("verdicts_agree", "–"))]
    return out


HEAD = ["scheme", "backend", "ms", "x fastest", "overhead", "held"]
WIDE_HEAD = ["first ms", "TFLOP/s", "IQR ms", "peak GiB", "err/bound", "jax-torch", "agree"]


def lines(rows: list[dict], title: str = "", *, wide: bool = False, width: int | None = None) -> list[str]:
    """The table as text lines, none wider than ``width``."""
    width = width or shutil.get_terminal_size((100, 24)).columns
    head = HEAD + (WIDE_HEAD if wide else [])
    shown = [r for r in rows if not r.get("skipped")]
    blocks: dict[str, list[list[str]]] = {}
    for r in shown:
        key = r["shape"] + (f"  ({r['pass']})" if r.get("pass") else "")
        blocks.setdefault(key, []).append(_cells(r, wide))
    cols = [len(h) for h in head]
    for cells in blocks.values():
        for c in cells:
            cols = [max(w, len(x)) for w, x in zip(cols, c)]
    sep = 2
    spare = width - (sum(cols) + sep * (len(cols) - 1))
    if spare < 0:  # the scheme column gives way first
        cols[0] = max(MIN_LABEL, cols[0] + spare)

    def fit(c: list[str]) -> str:
        parts = []
        for i, (x, w) in enumerate(zip(c, cols)):
            x = x if len(x) <= w else x[: max(w - 1, 1)] + "…"
            parts.append(x.ljust(w) if i < 2 else x.rjust(w))
        return (" " * sep).join(parts).rstrip()[:width]

    out = [t[:width] for t in textwrap.wrap(title, width)] if title else []
    out.append(fit(head))
    for shape, cells in blocks.items():
        out.append(shape[:width])
        out += [fit(c) for c in cells]
    out += skipped_lines(rows, width)
    return out


def skipped_lines(rows: list[dict], width: int) -> list[str]:
    """One wrapped line per skip reason: how many rows, and which series."""
    reasons: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("skipped"):
            reasons.setdefault(str(r["skipped"]), []).append(r)
    out = []
    for reason, rs in reasons.items():
        series = ", ".join(dict.fromkeys(f"{series_label(r)} ({r.get('backend', '?')})" for r in rs))
        text = f"skipped, {len(rs)} rows: {reason} — {series}"
        out += textwrap.wrap(text, width, subsequent_indent="    ", break_long_words=True)
    return out


def render(rows: list[dict], title: str = "", *, wide: bool = False, width: int | None = None) -> None:
    print("\n".join(lines(rows, title, wide=wide, width=width)))
