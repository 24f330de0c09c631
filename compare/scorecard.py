"""The fault scorecard of ``python -m compare.faults``: the campaign's rows summarized per
backend (detection by site and bit with Wilson intervals, localization, correction,
clean runs, cross-backend agreement), printed, and drawn as heat maps."""

from __future__ import annotations

import numpy as np

from ftattn_spec.faults import SITE_CHECKS, wilson_interval
from ftattn_spec.implementations import record as implementation_record
from ftattn_spec.implementations import run_checks as implementation_checks

#: How far (in units of the threshold) two backends' residuals may be from the threshold
#: for their flags to differ by rounding alone (see ``compare.faults``).
AGREEMENT_BAND = 3.0
#: The sites a campaign injects at (``probs.replica``: the softmax's second evaluation).
CAMPAIGN_SITES: tuple[str, ...] = ("scores", "probs", "probs.replica", "out", "query", "key", "value")


def protected(site: str, scheme: str, implementation: str = "unfused") -> bool:
    """Does ``scheme`` run a check that can see a fault at ``site`` (under ``implementation``)?"""
    return bool(set(SITE_CHECKS[site.split(".")[0]]) & set(implementation_checks(implementation, scheme)))


def _rate(k: int, n: int) -> dict:
    lo, hi = wilson_interval(k, n)
    return {"count": k, "of": n, "rate": (k / n) if n else None, "ci95": [lo, hi]}


def _locates(implementation: str) -> bool:
    """Can ``implementation`` locate a bad element at all (row and column checks of one GEMM)?"""
    runs = set(implementation_record(implementation).checks)
    return {"qk_row", "qk_col"} <= runs or {"pv_row", "pv_col"} <= runs


def summarize(rows: list[dict], clean: dict, backends: list[str], scheme: str, implementations=None) -> dict:
    """Per backend: detection by site and bit, outcome counts, localization, correction.
    ``implementations`` maps a backend to the implementation it ran (default unfused)."""
    impls = {name: (implementations or {}).get(name, "unfused") for name in backends}
    out = {"backends": {}}
    if any(i != "unfused" for i in impls.values()):
        out["implementation"] = next(i for i in impls.values() if i != "unfused")
        runs = [set(implementation_checks(i, scheme)) for i in impls.values()]
        out["compared_checks"] = [c for c in implementation_checks("unfused", scheme) if all(c in r for r in runs)]
    for name in backends:
        impl = impls[name]
        locates = _locates(impl)
        by_site, by_cell = {}, {}
        for row in rows:
            r = row["backends"][name]
            key = (row["dtype"], row["site"])
            s = by_site.setdefault(key, dict(trials=0, detected=0, harmless=0, below_limit=0, missed=0, located=0, locatable=0,
                                            corrected=0, correctable=0))
            s["trials"] += 1
            if r["detected"]:
                s["detected"] += 1
                s["correctable"] += 1
                s["corrected"] += int(r["corrected"])
                if "located" in r:
                    s["locatable"] += 1
                    s["located"] += int(r["located"])
            elif r["harmful"] and r["beyond_limit"]:
                s["missed"] += 1
            elif r["harmful"]:
                s["below_limit"] += 1
            else:
                s["harmless"] += 1
            c = by_cell.setdefault(f"{row['dtype']}|{row['site']}|{row['bit']}", [0, 0])
            c[0] += int(r["detected"])
            c[1] += 1
        sites = []
        for (dtype, site), s in sorted(by_site.items(), key=lambda kv: (kv[0][0], CAMPAIGN_SITES.index(kv[0][1]))):
            sites.append(dict(dtype=dtype, site=site, protected=protected(site, scheme, impl), **s,
                              detection=_rate(s["detected"], s["trials"]),
                              localization=_rate(s["located"], s["locatable"]) if locates else None,
                              correction=_rate(s["corrected"], s["correctable"])))
        prot = [s for s in sites if s["protected"]]
        total = lambda k, ss: sum(s[k] for s in ss)  # noqa: E731
        single = [s for s in prot if s["site"] in ("scores", "out")]
        out["backends"][name] = {
            "implementation": impl, "locates": locates,
            "sites": sites, "cells": by_cell,
            "missed_protected": total("missed", prot),
            "below_limit_protected": total("below_limit", prot),
            "missed_unprotected": total("missed", [s for s in sites if not s["protected"]]),
            "localization": _rate(total("located", single), total("locatable", single)) if locates else None,
            "correction": _rate(total("corrected", prot), total("correctable", prot)),
            "clean": _rate(clean["flagged"][name], clean["runs"]) if clean["runs"] else None,
        }
    if len(backends) > 1:
        out["agreement"] = _rate(sum(r["agree"] for r in rows), len(rows))
        if any("agree_detected" in r for r in rows):
            out["agreement_detected"] = _rate(sum(r.get("agree_detected", r["agree"]) for r in rows), len(rows))
        out["agreement_flags"] = _rate(sum(r["agree_flags"] for r in rows), len(rows))
        out["agreement_outside_band"] = _rate(sum(r["agree_or_band"] for r in rows), len(rows))
    return out


def _pct(r: dict | None) -> str:
    if not r or not r["of"]:
        return "–"
    return f"{100 * r['rate']:.1f}% [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]"


def render(summary: dict, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    for name, b in summary["backends"].items():
        name = escape(_label(summary, name))
        t = Table(title=f"{name}: faults by site (detection rate with 95% Wilson interval)")
        for col in ("dtype", "site", "protected", "trials", "detected", "harmless", "below limit", "missed",
                    "detection", "located", "corrected"):
            t.add_column(col, justify="right" if col not in ("dtype", "site") else "left")
        for s in b["sites"]:
            t.add_row(s["dtype"], s["site"], "yes" if s["protected"] else "no (input)", str(s["trials"]),
                      str(s["detected"]), str(s["harmless"]), str(s["below_limit"]), str(s["missed"]),
                      _pct(s["detection"]),
                      f"{s['located']}/{s['locatable']}" if b.get("locates", True) else "n/a",
                      f"{s['corrected']}/{s['correctable']}")
        console.print(t)
        loc = _pct(b["localization"]) if b.get("locates", True) else f"n/a ({b['implementation']} locates nothing)"
        console.print(f"{name}: missed at protected sites {b['missed_protected']} (below the detection limit "
                      f"{b['below_limit_protected']}), at unprotected input sites "
                      f"{b['missed_unprotected']} (not expected to be caught); localization {loc}; "
                      f"correction {_pct(b['correction'])}; clean runs flagged "
                      f"{b['clean']['count'] if b['clean'] else '–'}/{b['clean']['of'] if b['clean'] else 0}")
    if "agreement" in summary and "compared_checks" in summary:
        pair = escape(", ".join(_label(summary, n) for n in summary["backends"]))
        console.print(f"cross-backend: {pair} compared on the checks both run "
                      f"({', '.join(summary['compared_checks'])}); their own verdicts (all their checks) agree in "
                      f"{_pct(summary.get('agreement_detected', summary['agreement']))}")
    if "agreement" in summary:
        on = " on those checks" if "compared_checks" in summary else ""
        console.print(f"cross-backend verdict agreement{on}: {_pct(summary['agreement'])}; "
                      f"every flag identical: {_pct(summary['agreement_flags'])}; "
                      f"identical or differing only inside the rounding band (residual <= {AGREEMENT_BAND:g}·threshold): "
                      f"{_pct(summary['agreement_outside_band'])}")


def _label(summary: dict, name: str) -> str:
    """A backend's name, with its implementation when the campaign is not all unfused."""
    if "implementation" not in summary:
        return name
    return f"{name} [{summary['backends'][name].get('implementation', 'unfused')}]"


def heatmap(summary: dict, path: str) -> None:
    """Detection rate per site × bit, one panel per backend and dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for name, b in summary["backends"].items():
        dtypes = sorted({k.split("|")[0] for k in b["cells"]})
        panels += [(_label(summary, name), d, b["cells"]) for d in dtypes]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 2.2 + 0.45 * len(CAMPAIGN_SITES) * len(panels)),
                             squeeze=False)
    for ax, (name, dtype, cells) in zip(axes[:, 0], panels):
        sites = [s for s in CAMPAIGN_SITES if any(k.startswith(f"{dtype}|{s}|") for k in cells)]
        grid = np.full((len(sites), 32), np.nan)
        for y, s in enumerate(sites):
            for bit in range(32):
                c = cells.get(f"{dtype}|{s}|{bit}")
                if c:
                    grid[y, bit] = c[0] / c[1]
        im = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_yticks(range(len(sites)), sites)
        ax.set_xticks(range(0, 32, 2))
        ax.set_title(f"{name} · {dtype}: detection rate per site and bit (bit 0 = least significant)")
        fig.colorbar(im, ax=ax)
    axes[-1, 0].set_xlabel("bit")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
