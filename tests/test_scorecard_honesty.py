"""The fault scorecards say what they measured (issue 20): detection over the faults that
mattered, every miss count with its 95% upper bound, exit codes 0/1/2, and an outcome map
whose data (and CSV) keeps the four outcomes apart. Fake campaign rows only: no kernels."""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys

import pytest

from compare import backward_faults, faults, scorecard
from compare.fault_options import UsageError
from compare.scorecard import miss_upper_bound

#: One backend's result in a campaign row (``compare.faults.run_trial``'s keys) per outcome.
RESULTS = {"detected": dict(detected=True, harmful=True, corrected=True, located=True),
           "harmless": dict(detected=False, harmful=False),
           "below_limit": dict(detected=False, harmful=True, beyond_limit=False),
           "missed": dict(detected=False, harmful=True, beyond_limit=True)}


def _rows(spec: dict, backends=("jax",), dtype="float16") -> list[dict]:
    """Campaign rows from ``{(site, bit): [outcome, ...]}``, the same outcomes in every backend."""
    rows = []
    for (site, bit), outcomes in spec.items():
        for o in outcomes:
            row = dict(dtype=dtype, site=site, bit=bit, index=[0, 0, 0, 0],
                       backends={b: dict(RESULTS[o]) for b in backends})
            if len(backends) > 1:
                row.update(agree=True, agree_flags=True, agree_or_band=True)
            rows.append(row)
    return rows


def _summary(spec, flagged=0, scheme="full", backends=("jax",)):
    clean = {"runs": 10, "flagged": {b: flagged for b in backends}}
    return scorecard.summarize(_rows(spec, backends), clean, list(backends), scheme)


def _site(summary, site, backend="jax"):
    return next(s for s in summary["backends"][backend]["sites"] if s["site"] == site)


# ---- 1. detection over the faults that mattered


def test_detection_rate_excludes_harmless_faults():
    """6 detected and 4 harmless: nothing that mattered was missed, so detection is 100%, not 60%."""
    s = _site(_summary({("scores", 30): ["detected"] * 6, ("scores", 2): ["harmless"] * 4}), "scores")
    assert (s["trials"], s["detected"], s["harmless"], s["below_limit"], s["missed"]) == (10, 6, 4, 0, 0)
    assert s["mattered"] == 6
    assert s["detection"]["count"] == 6 and s["detection"]["of"] == 6 and s["detection"]["rate"] == 1.0


def test_detection_rate_counts_below_limit_and_missed_as_mattered():
    spec = {("out", 30): ["detected"] * 3, ("out", 12): ["below_limit", "missed"], ("out", 1): ["harmless"] * 5}
    s = _site(_summary(spec), "out")
    assert s["mattered"] == 5 and s["detection"]["of"] == 5
    assert math.isclose(s["detection"]["rate"], 3 / 5)
    lo, hi = s["detection"]["ci95"]
    assert lo < 0.6 < hi


def test_no_fault_mattered_gives_no_rate_and_valid_json():
    summary = _summary({("scores", 0): ["harmless"] * 3})
    s = _site(summary, "scores")
    assert s["detection"] == {"count": 0, "of": 0, "rate": None, "ci95": None}
    assert s["miss"]["upper95"] == 1.0  # 0 of 0 says nothing
    json.dumps(summary, allow_nan=False)  # no NaN in the JSON


def test_render_prints_detection_over_mattered_and_bounded_misses():
    from rich.console import Console

    summary = _summary({("scores", 30): ["detected"] * 6, ("scores", 2): ["harmless"] * 4})
    console = Console(record=True, width=250)
    scorecard.render(summary, console)
    text = " ".join(console.export_text().split())
    assert "100.0%" in text and "60.0%" not in text
    assert "harmless faults" in text and "excluded" in text  # the legend says so
    bound = 100 * (1 - 0.05 ** (1 / 6))
    assert f"0 (≤ {bound:.3g}%)" in text  # the table's miss cell
    assert f"0 missed (≤ {bound:.3g}% at 95%) of 6" in text  # the protected-site total


# ---- 2. the 95% upper bound on the miss rate


@pytest.mark.parametrize("n", [1, 5, 10, 64, 300, 10_000])
def test_zero_misses_bound_is_exact(n):
    assert math.isclose(miss_upper_bound(0, n), 1 - 0.05 ** (1 / n), rel_tol=1e-12)


# one-sided 95% Clopper–Pearson upper limits, the 0.95 quantile of Beta(k + 1, n - k)
# (k=1, n=10: 0.3942; the two-sided 95% interval's upper end would be 0.4450)
KNOWN = [(1, 10, 0.39416), (2, 20, 0.28262), (5, 100, 0.10225), (10, 10, 1.0), (0, 0, 1.0)]


@pytest.mark.parametrize("k,n,upper", KNOWN)
def test_clopper_pearson_known_values(k, n, upper):
    assert math.isclose(miss_upper_bound(k, n), upper, abs_tol=5e-5)


@pytest.mark.parametrize("k,n,upper", KNOWN)
def test_clopper_pearson_without_scipy(k, n, upper, monkeypatch):
    """The bisection fallback gives the same numbers when SciPy cannot be imported."""
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    assert math.isclose(miss_upper_bound(k, n), upper, abs_tol=5e-5)


@pytest.mark.parametrize("k,n", [(1, 10), (3, 50), (7, 400)])
def test_bound_solves_the_binomial_tail(k, n):
    """By definition P(X <= k | n, upper) = 5%: checked with an exact sum, not the helper's own."""
    p = miss_upper_bound(k, n)
    tail = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
    assert math.isclose(tail, 0.05, abs_tol=1e-9)
    assert miss_upper_bound(k, n) < miss_upper_bound(k + 1, n)  # more misses, a larger bound


@pytest.mark.parametrize("args,name", [((-1, 5), "k"), ((6, 5), "k"), ((0, -2), "n"), ((1.5, 4), "k")])
def test_bound_rejects_bad_counts(args, name):
    with pytest.raises(ValueError, match=f"miss_upper_bound: {name} expected"):
        miss_upper_bound(*args)
    with pytest.raises(ValueError, match="level expected"):
        miss_upper_bound(0, 5, level=1.5)


def test_summary_carries_the_bounds():
    spec = {("scores", 30): ["detected"] * 9 + ["missed"], ("value", 3): ["missed", "harmless"]}
    b = _summary(spec)["backends"]["jax"]
    s = _site(_summary(spec), "scores")
    assert s["miss"]["count"] == 1 and s["miss"]["of"] == 10
    assert math.isclose(s["miss"]["upper95"], 0.39416, abs_tol=5e-5)
    assert b["miss_protected"]["count"] == 1 and b["miss_unprotected"] == dict(
        count=1, of=1, rate=1.0, upper95=1.0)
    assert "harmless" in _summary(spec)["definitions"]["detection"]


# ---- 3. exit codes


def test_miss_at_a_protected_site_fails():
    summary = _summary({("scores", 30): ["detected", "missed"], ("value", 3): ["harmless"]})
    assert scorecard.exit_status(summary) == 1
    assert any("scores" in line and "protected" in line for line in scorecard.failures(summary))


def test_miss_only_at_an_unprotected_site_passes():
    summary = _summary({("scores", 30): ["detected", "harmless", "below_limit"], ("value", 3): ["missed"] * 3})
    assert summary["backends"]["jax"]["missed_unprotected"] == 3
    assert scorecard.failures(summary) == [] and scorecard.exit_status(summary) == 0


def test_what_a_scheme_does_not_protect_does_not_fail():
    """Under ``baseline`` (no checks) a miss in the scores is expected: protected() decides."""
    assert not scorecard.protected("scores", "baseline")
    assert scorecard.exit_status(_summary({("scores", 30): ["missed"]}, scheme="baseline")) == 0


def test_a_clean_run_flagged_fails():
    summary = _summary({("scores", 30): ["detected"]}, flagged=1, backends=("jax", "torch"))
    assert scorecard.exit_status(summary) == 1
    assert len(scorecard.failures(summary)) == 2  # one line per backend
    assert "false positive" in scorecard.failures(summary)[0]


@pytest.mark.parametrize("argv,flag", [(["--trials", "0"], "--trials"), (["--clean", "-1"], "--clean"),
                                       (["--backends", "nope"], "--backends"), (["--bits", "40"], "--bits"),
                                       (["--sites", "query", "--bits", "20", "--dtype", "float16"], "--sites")])
def test_usage_error_exits_2(argv, flag, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # should a bad option run after all, its results stay out of the repository
    with pytest.raises(SystemExit) as e:
        faults.main(argv)
    assert e.value.code == 2 and isinstance(e.value, UsageError)
    err = capsys.readouterr().err
    assert f"error: {flag}" in err and "usage:" in err


def test_argparse_usage_error_exits_2():
    with pytest.raises(SystemExit) as e:
        faults.main(["--scheme", "nope"])
    assert e.value.code == 2


def test_out_that_is_a_file_exits_2(tmp_path, capsys):
    path = tmp_path / "a-file"
    path.write_text("")
    with pytest.raises(SystemExit) as e:
        faults.main(["--sites", "scores", "--bits", "30", "--out", str(path)])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err


def test_usage_error_exit_status_from_the_interpreter():
    """Uncaught, the error ends ``python -m compare.faults`` with status 2 and its message."""
    p = subprocess.run([sys.executable, "-m", "compare.faults", "--trials", "0"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p.stderr
    assert "--trials: expected an integer >= 1, got 0" in p.stderr


@pytest.mark.parametrize("argv,flag", [(["--trials", "0"], "--trials"), (["--shape", "N=3,K=2"], "--shape")])
def test_backward_usage_error_returns_2(argv, flag, capsys):
    assert backward_faults.main(argv) == 2
    assert f"error: {flag}" in capsys.readouterr().err


def test_every_option_has_help_and_its_default():
    ap = faults.build_parser()
    assert ap.formatter_class is argparse.ArgumentDefaultsHelpFormatter
    for action in ap._actions:
        assert action.help, action.option_strings
    choices = {a.dest: a.choices for a in ap._actions}
    assert choices["scheme"] and choices["mask"] and choices["implementation"]
    assert " ".join(ap.format_help().split()).count("(default:") == len(ap._actions) - 1  # all but --help


def test_backward_help_shows_every_default(capsys):
    assert backward_faults.main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.count("(default:") == 10 and "exit status" in text  # every option but --help


# ---- 4. the outcome map: data, panels, CSV, figure

SPEC = {("scores", 30): ["detected", "detected"], ("scores", 2): ["harmless", "below_limit"],
        ("value", 3): ["missed", "harmless"]}


def test_outcome_table_keeps_the_four_categories():
    table = scorecard.outcome_table(_rows(SPEC, ("jax", "torch"), "bfloat16"))
    assert len(table) == 2 * 3
    assert [(r["backend"], r["site"], r["bit"]) for r in table[:3]] == [
        ("jax", "scores", 2), ("jax", "scores", 30), ("jax", "value", 3)]
    for r in table:
        assert set(scorecard.OUTCOMES) <= set(r) and r["dtype"] == "bfloat16"
        assert sum(r[c] for c in scorecard.OUTCOMES) == r["trials"] == 2
    by = {(r["backend"], r["site"], r["bit"]): r for r in table}
    assert by[("torch", "scores", 2)]["harmless"] == 1 and by[("torch", "scores", 2)]["below_limit"] == 1
    assert by[("torch", "value", 3)]["missed"] == 1 and by[("jax", "scores", 30)]["detected"] == 2


def test_outcome_panels_title_misses_with_their_bound():
    panels = scorecard.outcome_panels(scorecard.outcome_table(_rows(SPEC)))
    scores, value = panels
    assert (scores["site"], scores["missed"], scores["mattered"]) == ("scores", 0, 3)
    assert scores["note"] == f"0 missed (≤ {100 * (1 - 0.05 ** (1 / 3)):.3g}% at 95%)"
    assert value["note"] == "1 missed (≤ 100% at 95%); input, no check sees it"
    assert scores["bits"] == [2, 30] and scores["counts"]["below_limit"] == [1, 0]
    assert [sum(col) for col in zip(*scores["counts"].values())] == scores["trials"]


def test_csv_written_beside_the_plot(tmp_path):
    table = scorecard.outcome_table(_rows(SPEC, ("jax", "torch")))
    csv_path, png_path = scorecard.save_outcomes(table, str(tmp_path), "faults.png")
    assert csv_path == str(tmp_path / "outcomes.csv") and png_path == str(tmp_path / "faults.png")
    assert (tmp_path / "faults.png").stat().st_size > 5_000
    with open(csv_path, newline="") as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == ["backend", "dtype", "site", "bit", "detected", "harmless", "below_limit", "missed",
                             "trials"]
    assert [{k: str(v) for k, v in r.items()} for r in table] == read


def test_summary_holds_the_outcome_table():
    rows = _rows(SPEC, ("jax", "torch"))
    summary = scorecard.summarize(rows, {"runs": 0, "flagged": {}}, ["jax", "torch"], "full")
    assert summary["outcomes"] == scorecard.outcome_table(rows)


# ---- the backward scorecard


def _backward_results():
    res = [dict(kind="clean", backend="torch", dtype="float16", detected=0)]
    for site, replica, bit, outcome in [("bwd_ds", 0, 27, "detected"), ("bwd_ds", 1, 27, "detected"),
                                        ("bwd_ds", 1, 3, "harmless"), ("bwd_dv", 0, 27, "detected"),
                                        ("bwd_dv", 0, 3, "harmless")]:
        res.append(dict(kind="fault", backend="torch", dtype="float16", site=site, replica=replica, bit=bit,
                        outcome=outcome))
    return res


def test_backward_summary_bounds_misses_among_faults_that_mattered():
    s = backward_faults.summarize(_backward_results())
    assert (s["trials"], s["detected"], s["harmless"], s["missed"], s["mattered"]) == (5, 3, 2, 0, 3)
    assert math.isclose(s["miss"]["upper95"], 1 - 0.05 ** (1 / 3))  # among the 3 that mattered, not all 5
    row = next(r for r in s["rows"] if (r["site"], r["replica"]) == ("bwd_ds", 1))
    assert row["miss"]["of"] == 1 and math.isclose(row["miss"]["upper95"], 0.95)
    assert backward_faults.exit_status(s) == 0
    json.dumps(s, allow_nan=False)


def test_backward_exit_status():
    results = _backward_results()
    assert backward_faults.exit_status(backward_faults.summarize(results + [dict(
        kind="fault", backend="jax", dtype="float16", site="bwd_dp", replica=0, bit=30, outcome="missed")])) == 1
    assert backward_faults.exit_status(backward_faults.summarize(results + [dict(
        kind="clean", backend="jax", dtype="float16", detected=1)])) == 1


def test_backward_outcome_table_and_print(tmp_path, capsys):
    table = backward_faults.outcome_table(_backward_results())
    assert {r["site"] for r in table} == {"bwd_ds.r0", "bwd_ds.r1", "bwd_dv"}
    for r in table:
        assert "below_limit" not in r and sum(r[c] for c in scorecard.BACKWARD_OUTCOMES) == r["trials"]
    scorecard.save_outcomes(table, str(tmp_path), "backward_faults.png", scorecard.BACKWARD_OUTCOMES)
    header = (tmp_path / "outcomes.csv").read_text().splitlines()[0]
    assert header == "backend,dtype,site,bit,detected,harmless,missed,trials"
    backward_faults.print_summary(backward_faults.summarize(_backward_results()))
    out = capsys.readouterr().out
    assert f"0 missed (≤ {100 * (1 - 0.05 ** (1 / 3)):.3g}% at 95%)" in out and "harmless faults excluded" in out


def test_backward_module_has_no_inline_bound():
    """The backward uses the shared helper, not its own copy of the formula."""
    import inspect

    assert "0.05 **" not in inspect.getsource(backward_faults)
