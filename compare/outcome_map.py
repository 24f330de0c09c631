"""The outcome map of a fault campaign: per backend, dtype, site and bit, the count of every
outcome (:data:`compare.bounds.OUTCOMES`), as data (:func:`outcome_table`,
:func:`outcome_panels`), as CSV and as a figure whose panel titles give the misses with their
95% upper bound. The data and the drawing are separate so tests check what is drawn."""

from __future__ import annotations

import csv
import os

import numpy as np

from ftattn_spec.faults import SITE_CHECKS

from .bounds import OUTCOMES, bound_text, outcome

#: The sites a campaign injects at (``probs.replica``: the softmax's second evaluation), in the
#: order the map draws them.
CAMPAIGN_SITES: tuple[str, ...] = ("scores", "probs", "probs.replica", "out", "query", "key", "value")


def outcome_table(rows: list[dict], backends=None) -> list[dict]:
    """The outcome map's data: one dict per (backend, dtype, site, bit) of a forward campaign's
    ``rows`` with ``backend, dtype, site, bit``, the count of each of :data:`OUTCOMES` and
    ``trials`` (their sum). ``backends`` (default: those of the first row) sets their order."""
    backends = list(backends or (rows[0]["backends"] if rows else ()))
    cells = {}
    for row in rows:
        for name in backends:
            key = (name, row["dtype"], row["site"], row["bit"])
            c = cells.setdefault(key, dict(zip(OUTCOMES, (0,) * len(OUTCOMES))))
            c[outcome(row["backends"][name])] += 1
    dtypes = list(dict.fromkeys(row["dtype"] for row in rows))
    order = lambda k: (backends.index(k[0]), dtypes.index(k[1]), _site_order(k[2]), k[3])  # noqa: E731
    return [dict(backend=k[0], dtype=k[1], site=k[2], bit=k[3], **c, trials=sum(c.values()))
            for k, c in sorted(cells.items(), key=lambda kv: order(kv[0]))]


def _site_order(site: str):
    return (CAMPAIGN_SITES.index(site), site) if site in CAMPAIGN_SITES else (len(CAMPAIGN_SITES), site)


def outcome_panels(table: list[dict], categories=OUTCOMES) -> list[dict]:
    """The outcome map's panels, one per (backend, dtype, site) in the table's order: its
    ``bits``, per category the counts per bit, ``missed`` and ``mattered`` over all bits,
    and ``note``, the miss count with its 95% upper bound (:func:`bound_text`), saying so
    where the site is an input that no check sees."""
    panels = {}
    for r in table:
        p = panels.setdefault((r["backend"], r["dtype"], r["site"]),
                              dict(backend=r["backend"], dtype=r["dtype"], site=r["site"], bits=[], trials=[],
                                   counts={c: [] for c in categories}))
        p["bits"].append(r["bit"])
        p["trials"].append(r["trials"])
        for c in categories:
            p["counts"][c].append(r.get(c, 0))
    for p in panels.values():
        p["missed"] = sum(p["counts"].get("missed", []))
        p["mattered"] = sum(sum(v) for c, v in p["counts"].items() if c != "harmless")
        p["note"] = bound_text(p["missed"], p["mattered"])
        if not SITE_CHECKS.get(p["site"].split(".")[0], True):  # an input: misses there are expected
            p["note"] += "; input, no check sees it"
    return list(panels.values())


def write_outcomes_csv(table: list[dict], path: str, categories=OUTCOMES) -> None:
    """The outcome map's data as CSV: ``backend, dtype, site, bit``, one column per category, ``trials``."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["backend", "dtype", "site", "bit", *categories, "trials"], extrasaction="ignore")
        w.writeheader()
        w.writerows(table)


#: Colour and hatch per outcome: distinct in colour and in grey.
_STYLE = {"detected": ("#2f9e44", ""), "harmless": ("#ced4da", ""), "below_limit": ("#f08c00", ".."),
          "missed": ("#c92a2a", "//")}


def plot_outcomes(table: list[dict], path: str, categories=OUTCOMES, title: str = "fault outcomes") -> None:
    """Draw the outcome map (matplotlib, Agg): one panel per (backend, dtype) row and site column,
    a stacked bar per bit with one colour per category, the panel's title its miss count with
    the 95% upper bound. The data is :func:`outcome_panels`'s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels = outcome_panels(table, categories)
    rows = list(dict.fromkeys((p["backend"], p["dtype"]) for p in panels))
    ncols = max([sum(1 for p in panels if (p["backend"], p["dtype"]) == r) for r in rows] or [1])
    fig, axes = plt.subplots(max(len(rows), 1), ncols, figsize=(0.6 + 2.9 * ncols, 1.2 + 2.3 * max(len(rows), 1)),
                             squeeze=False)
    used = set()
    for y, r in enumerate(rows):
        for x, p in enumerate(q for q in panels if (q["backend"], q["dtype"]) == r):
            ax = axes[y, x]
            used.add((y, x))
            bottom = np.zeros(len(p["bits"]))
            for c in categories:
                colour, hatch = _STYLE.get(c, ("#1971c2", ""))
                ax.bar(p["bits"], p["counts"][c], bottom=bottom, width=0.85, color=colour, hatch=hatch,
                       edgecolor="#495057" if hatch else colour, linewidth=0.3)
                bottom += np.asarray(p["counts"][c])
            ax.set_title(f"{p['backend']} · {p['dtype']} · {p['site']}\n{p['note']}", fontsize=8)
            ax.set_xlim(-0.5, max(p["bits"]) + 0.5)
            ax.tick_params(labelsize=7)
            if x == 0:
                ax.set_ylabel("trials", fontsize=8)
            if y == len(rows) - 1:
                ax.set_xlabel("bit (0 = least significant)", fontsize=8)
    for (y, x), ax in np.ndenumerate(axes):
        if (y, x) not in used:
            ax.axis("off")
    height = fig.get_figheight()
    fig.suptitle(f"{title}: count per site and bit; panel titles: misses with the one-sided 95% upper bound on "
                 f"the miss rate among the faults that mattered", fontsize=9, y=1 - 0.08 / height)
    fig.legend([Patch(facecolor=_STYLE.get(c, ("#1971c2", ""))[0], hatch=_STYLE.get(c, ("", ""))[1],
                      edgecolor="#495057") for c in categories], [c.replace("_", " ") for c in categories],
               loc="upper center", bbox_to_anchor=(0.5, 1 - 0.3 / height), ncol=len(categories), fontsize=9,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / height))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_outcomes(table: list[dict], folder: str, plot_name: str = "faults.png", categories=OUTCOMES,
                  title: str = "fault outcomes") -> tuple[str, str]:
    """Write the outcome map and its data side by side: ``folder/outcomes.csv`` and
    ``folder/plot_name``. Returns both paths."""
    csv_path, png_path = os.path.join(folder, "outcomes.csv"), os.path.join(folder, plot_name)
    write_outcomes_csv(table, csv_path, categories)
    plot_outcomes(table, png_path, categories, title)
    return csv_path, png_path
