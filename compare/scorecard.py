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

from ftattn_spec.faults import INPUT_SITES, SITE_CHECKS, wilson_interval
from ftattn_spec.implementations import record as implementation_record
from ftattn_spec.implementations import run_checks as implementation_checks

# the bounds and the outcome map, re-exported: the fault commands and their tests reach them here
from .bounds import (BACKWARD_OUTCOMES, DEFINITIONS, OUTCOMES, bound_text, mattered,  # noqa: F401
                     miss_rate, miss_upper_bound, outcome)
from .outcome_map import (CAMPAIGN_SITES, outcome_panels, outcome_table, plot_outcomes,  # noqa: F401
                          save_outcomes, write_outcomes_csv)

#: How far (in units of the threshold) two backends' residuals may be from the threshold
#: for their flags to differ by rounding alone (see ``compare.faults``).
AGREEMENT_BAND = 3.0


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
            t.add_row(s["dtype"], s["site"], "yes" if s["protected"] else ("no (input)" if s["site"] in INPUT_SITES else "no (scheme)"), str(s["trials"]),
                      str(s["detected"]), str(s["harmless"]), str(s["below_limit"]), _missed(s["miss"]),
                      _pct(s["detection"]),
                      f"{s['located']}/{s['locatable']}" if b.get("locates", True) else "n/a",
                      f"{s['corrected']}/{s['correctable']}")
        console.print(t)
        console.print(escape(LEGEND), style="dim")
        loc = _pct(b["localization"]) if b.get("locates", True) else f"n/a ({b['implementation']} locates nothing)"
        prot, unprot = b["miss_protected"], b["miss_unprotected"]
        console.print(f"{name}: at protected sites {_bound_phrase(prot)} that mattered (below the detection limit "
                      f"{b['below_limit_protected']}), at unprotected sites (inputs, or sites the scheme does not check) "
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
