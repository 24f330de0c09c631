"""The fault scorecard of ``python -m compare.faults``: the campaign's rows summarized per
backend (outcome counts by site and bit, localization, correction, clean runs,
cross-backend agreement), printed, checked, and drawn as an outcome map.

Each faulty run has one of four outcomes (:data:`OUTCOMES`): detected, harmless (the
output still meets the tolerance), below the detection limit, missed. Harmless faults
changed nothing that matters, so they say nothing about the checks: the **detection
rate** is detected / the faults that mattered (detected + below limit + missed), with
its 95% Wilson interval, and every **miss count** is shown with the one-sided 95%
Clopper–Pearson upper bound on the miss rate among the faults that mattered
(:func:`miss_upper_bound`). The raw counts of all four outcomes are kept.

Exit status of the fault commands (:func:`exit_status`): 0 every check holds, 1 a check
failed (a clean run flagged, or a miss at a protected site; misses at unprotected input
sites are expected), 2 a usage error.
"""

from __future__ import annotations

import csv
import math
import os

import numpy as np

from ftattn_spec.faults import SITE_CHECKS, wilson_interval
from ftattn_spec.implementations import record as implementation_record
from ftattn_spec.implementations import run_checks as implementation_checks

#: How far (in units of the threshold) two backends' residuals may be from the threshold
#: for their flags to differ by rounding alone (see ``compare.faults``).
AGREEMENT_BAND = 3.0
#: The sites a campaign injects at (``probs.replica``: the softmax's second evaluation).
CAMPAIGN_SITES: tuple[str, ...] = ("scores", "probs", "probs.replica", "out", "query", "key", "value")


#: The outcomes of a forward campaign, in the order they are drawn.
OUTCOMES: tuple[str, ...] = ("detected", "harmless", "below_limit", "missed")
#: The outcomes of a backward campaign (``compare.backward_faults``): no detection limit there.
BACKWARD_OUTCOMES: tuple[str, ...] = ("detected", "harmless", "missed")
#: What the rates mean, written into the JSON next to them.
DEFINITIONS = {
    "mattered": "faults that mattered: every outcome except harmless (detected + below_limit + missed)",
    "detection": "detected / faults that mattered (harmless faults excluded), 95% Wilson interval",
    "miss": "missed / faults that mattered; upper95 is the one-sided 95% Clopper-Pearson upper bound "
            "on the miss rate (1 - 0.05**(1/n) when 0 of n)",
}


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), 0 < p < 1, summed in logs (no overflow at large n)."""
    lp, lq = math.log(p), math.log1p(-p)
    lg = math.lgamma
    return math.fsum(math.exp(lg(n + 1) - lg(i + 1) - lg(n - i + 1) + i * lp + (n - i) * lq) for i in range(k + 1))


def _upper_by_bisection(k: int, n: int, alpha: float) -> float:
    """The p with P(X <= k | n, p) = alpha (the CDF falls as p grows), by bisection on [k/n, 1]."""
    lo, hi = k / n, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _binom_cdf(k, n, mid) > alpha:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13:
            break
    return 0.5 * (lo + hi)


def miss_upper_bound(k: int, n: int, level: float = 0.95) -> float:
    """One-sided Clopper–Pearson upper bound at ``level`` on a rate seen ``k`` times in ``n`` trials.

    The exact bound: the largest rate p with P(X <= k | n, p) >= 1 - level, i.e. the
    ``level`` quantile of Beta(k + 1, n - k). One-sided, because the question is "how large
    can the miss rate be?": k=0 gives 1 - (1 - level)**(1/n) (n=10: 0.2589), k=1, n=10 gives
    0.3942 (the two-sided 95% interval's upper end, 0.4450, is the one-sided 97.5% bound).
    No trials (n=0) say nothing: 1.0. SciPy's Beta quantile when importable, else a bisection
    on the binomial CDF (:func:`_upper_by_bisection`; the two agree to 1e-9).
    """
    if not (isinstance(n, (int, np.integer)) and n >= 0):
        raise ValueError(f"miss_upper_bound: n expected an integer >= 0, got {n!r}")
    if not (isinstance(k, (int, np.integer)) and 0 <= k <= n):
        raise ValueError(f"miss_upper_bound: k expected an integer in 0..n={n}, got {k!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"miss_upper_bound: level expected in (0, 1), got {level!r}")
    k, n = int(k), int(n)
    alpha = 1.0 - level
    if n == 0 or k == n:
        return 1.0
    if k == 0:
        return 1.0 - alpha ** (1.0 / n)
    try:
        from scipy.stats import beta
    except ImportError:
        return _upper_by_bisection(k, n, alpha)
    return float(beta.ppf(level, k + 1, n - k))


def bound_text(k: int, n: int) -> str:
    """``"0 missed (≤ 9.5% at 95%)"``: a miss count with its bound among the ``n`` that mattered."""
    if n == 0:
        return f"{k} missed (no fault mattered)"
    return f"{k} missed (≤ {100 * miss_upper_bound(k, n):.3g}% at 95%)"


def outcome(result: dict) -> str:
    """The outcome (one of :data:`OUTCOMES`) of one backend's result in a campaign row."""
    if result["detected"]:
        return "detected"
    if result["harmful"] and result["beyond_limit"]:
        return "missed"
    if result["harmful"]:
        return "below_limit"
    return "harmless"


def mattered(counts: dict) -> int:
    """How many faults mattered: every outcome counted in ``counts`` except harmless."""
    return sum(counts.get(c, 0) for c in OUTCOMES if c != "harmless")


def miss_rate(k: int, n: int) -> dict:
    """``k`` misses among ``n`` faults that mattered: count, rate and the 95% upper bound."""
    return {"count": k, "of": n, "rate": (k / n) if n else None, "upper95": miss_upper_bound(k, n)}


def protected(site: str, scheme: str, implementation: str = "unfused") -> bool:
    """Does ``scheme`` run a check that can see a fault at ``site`` (under ``implementation``)?"""
    return bool(set(SITE_CHECKS[site.split(".")[0]]) & set(implementation_checks(implementation, scheme)))


def _rate(k: int, n: int) -> dict:
    """``k`` of ``n`` with its 95% Wilson interval (null for no trials: JSON has no NaN)."""
    if not n:
        return {"count": k, "of": n, "rate": None, "ci95": None}
    lo, hi = wilson_interval(k, n)
    return {"count": k, "of": n, "rate": k / n, "ci95": [lo, hi]}


def _locates(implementation: str) -> bool:
    """Can ``implementation`` locate a bad element at all (row and column checks of one GEMM)?"""
    runs = set(implementation_record(implementation).checks)
    return {"qk_row", "qk_col"} <= runs or {"pv_row", "pv_col"} <= runs


def summarize(rows: list[dict], clean: dict, backends: list[str], scheme: str, implementations=None) -> dict:
    """Per backend and (dtype, site): the raw count of every outcome, the detection rate over
    the faults that mattered, the misses with their 95% upper bound, localization, correction;
    per backend the misses at protected and unprotected sites and the clean runs flagged.
    ``rows`` are :func:`compare.faults.run_trial`'s; ``clean`` is
    :func:`compare.faults.clean_runs`'s; ``implementations`` maps a backend to the
    implementation it ran (default unfused)."""
    impls = {name: (implementations or {}).get(name, "unfused") for name in backends}
    out = {"definitions": DEFINITIONS, "backends": {}}
    if any(i != "unfused" for i in impls.values()):
        out["implementation"] = next(i for i in impls.values() if i != "unfused")
        runs = [set(implementation_checks(i, scheme)) for i in impls.values()]
        out["compared_checks"] = [c for c in implementation_checks("unfused", scheme) if all(c in r for r in runs)]
    for name in backends:
        impl = impls[name]
        locates = _locates(impl)
        by_site = {}
        for row in rows:
            r = row["backends"][name]
            key = (row["dtype"], row["site"])
            s = by_site.setdefault(key, dict(trials=0, **dict.fromkeys(OUTCOMES, 0), located=0, locatable=0,
                                             corrected=0, correctable=0))
            s["trials"] += 1
            s[outcome(r)] += 1
            if r["detected"]:
                s["correctable"] += 1
                s["corrected"] += int(r["corrected"])
                if "located" in r:
                    s["locatable"] += 1
                    s["located"] += int(r["located"])
        sites = []
        for (dtype, site), s in sorted(by_site.items(), key=lambda kv: (kv[0][0], CAMPAIGN_SITES.index(kv[0][1]))):
            n = mattered(s)
            sites.append(dict(dtype=dtype, site=site, protected=protected(site, scheme, impl), **s, mattered=n,
                              detection=_rate(s["detected"], n), miss=miss_rate(s["missed"], n),
                              localization=_rate(s["located"], s["locatable"]) if locates else None,
                              correction=_rate(s["corrected"], s["correctable"])))
        prot = [s for s in sites if s["protected"]]
        unprot = [s for s in sites if not s["protected"]]
        total = lambda k, ss: sum(s[k] for s in ss)  # noqa: E731
        single = [s for s in prot if s["site"] in ("scores", "out")]
        out["backends"][name] = {
            "implementation": impl, "locates": locates,
            "sites": sites,
            "missed_protected": total("missed", prot),
            "below_limit_protected": total("below_limit", prot),
            "missed_unprotected": total("missed", unprot),
            "miss_protected": miss_rate(total("missed", prot), total("mattered", prot)),
            "miss_unprotected": miss_rate(total("missed", unprot), total("mattered", unprot)),
            "localization": _rate(total("located", single), total("locatable", single)) if locates else None,
            "correction": _rate(total("corrected", prot), total("correctable", prot)),
            "clean": _rate(clean["flagged"][name], clean["runs"]) if clean["runs"] else None,
        }
    out["outcomes"] = outcome_table(rows, backends)
    if len(backends) > 1:
        out["agreement"] = _rate(sum(r["agree"] for r in rows), len(rows))
        if any("agree_detected" in r for r in rows):
            out["agreement_detected"] = _rate(sum(r.get("agree_detected", r["agree"]) for r in rows), len(rows))
        out["agreement_flags"] = _rate(sum(r["agree_flags"] for r in rows), len(rows))
        out["agreement_outside_band"] = _rate(sum(r["agree_or_band"] for r in rows), len(rows))
    return out


def failures(summary: dict) -> list[str]:
    """The failed checks of a campaign's summary, one line each: a clean run flagged (a false
    positive), or a miss at a site the scheme protects (:func:`protected`). Misses at
    unprotected input sites (``query``, ``key``, ``value``) are expected and not listed;
    faults below the detection limit are not misses."""
    out = []
    for name, b in summary["backends"].items():
        if b.get("clean") and b["clean"]["count"]:
            out.append(f"{name}: {b['clean']['count']} of {b['clean']['of']} clean runs flagged (false positives)")
        for s in b["sites"]:
            if s["protected"] and s["missed"]:
                out.append(f"{name}: {s['missed']} missed at protected site {s['site']} ({s['dtype']}), "
                           f"of {s['mattered']} faults that mattered")
    return out


def exit_status(summary: dict) -> int:
    """0 when every check holds, 1 when one failed (:func:`failures`). Usage errors (2) never
    reach a summary."""
    return 1 if failures(summary) else 0


def _pct(r: dict | None) -> str:
    if not r or not r["of"]:
        return "–"
    return f"{100 * r['rate']:.1f}% [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]"


def _missed(r: dict) -> str:
    """A miss count and its bound, for a table cell: ``"0 (≤ 9.5%)"``."""
    if not r["of"]:
        return f"{r['count']} (of 0)"
    return f"{r['count']} (≤ {100 * r['upper95']:.3g}%)"


#: The legend printed under each backend's table.
LEGEND = ("detection = detected / faults that mattered (detected + below limit + missed; harmless faults, whose "
          "output still meets the tolerance, are excluded), with its 95% Wilson interval; missed (≤ x%) = the "
          "one-sided 95% Clopper–Pearson upper bound on the miss rate among the faults that mattered")


def render(summary: dict, console=None) -> None:
    """Print each backend's table (raw outcome counts, detection over the faults that mattered,
    misses with their bound), its totals, and the cross-backend agreement."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    for name, b in summary["backends"].items():
        name = escape(_label(summary, name))
        t = Table(title=f"{name}: faults by site (detection over the faults that mattered, harmless excluded)")
        for col in ("dtype", "site", "protected", "trials", "detected", "harmless", "below limit", "missed (≤ 95%)",
                    "detection", "located", "corrected"):
            t.add_column(col, justify="right" if col not in ("dtype", "site") else "left")
        for s in b["sites"]:
            t.add_row(s["dtype"], s["site"], "yes" if s["protected"] else "no (input)", str(s["trials"]),
                      str(s["detected"]), str(s["harmless"]), str(s["below_limit"]), _missed(s["miss"]),
                      _pct(s["detection"]),
                      f"{s['located']}/{s['locatable']}" if b.get("locates", True) else "n/a",
                      f"{s['corrected']}/{s['correctable']}")
        console.print(t)
        console.print(escape(LEGEND), style="dim")
        loc = _pct(b["localization"]) if b.get("locates", True) else f"n/a ({b['implementation']} locates nothing)"
        prot, unprot = b["miss_protected"], b["miss_unprotected"]
        console.print(f"{name}: at protected sites {_bound_phrase(prot)} that mattered (below the detection limit "
                      f"{b['below_limit_protected']}), at unprotected input sites "
                      f"{_bound_phrase(unprot)} (not expected to be caught); localization {loc}; "
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
                      f"identical or differing only inside the rounding band "
                      f"(residual <= {AGREEMENT_BAND:g}·threshold): {_pct(summary['agreement_outside_band'])}")


def _bound_phrase(r: dict) -> str:
    """``"0 missed (≤ 0.7% at 95%) of 412"``: :func:`bound_text` with the faults that mattered."""
    return f"{bound_text(r['count'], r['of'])} of {r['of']}" if r["of"] else bound_text(r["count"], 0)


def _label(summary: dict, name: str) -> str:
    """A backend's name, with its implementation when the campaign is not all unfused."""
    if "implementation" not in summary:
        return name
    return f"{name} [{summary['backends'][name].get('implementation', 'unfused')}]"


# ---- the outcome map: per site and bit, the count of every outcome (data, CSV, figure)


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
