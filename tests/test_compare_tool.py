"""The ``compare`` tool's front: one entry point, exit codes, a table that fits the terminal,
the plot's data, and the timing protocol. CPU only; fake rows where a run is not needed."""

from __future__ import annotations

import csv
import math

import pytest

from compare import __main__ as entry
from compare import plots, results, table, timing


def _rows():
    """Rows of two shapes in the run schema: peers, baselines, protected schemes, a failure,
    and skipped rows with two reasons."""
    out = []
    for T, shape in ((64, "B=2 N=4 T=64 S=64 H=32"), (256, "B=1 N=2 T=256 S=256 H=64")):
        base = dict(shape=shape, T=T, S=T, method="robust")
        out.append(dict(base, scheme="sdpa-math", backend="torch", peer=True, ms=1.0, detected=False))
        out.append(dict(base, scheme="jax-xla", backend="jax", peer=True, ms=0.8, detected=False))
        for backend in ("jax", "torch"):
            for scheme, ms in (("baseline", 1.2), ("abft_qk_row", 1.5), ("dmr_softmax", 1.9), ("full", 2.4)):
                out.append(dict(base, scheme=scheme, backend=backend, implementation="unfused", ms=ms,
                                detected=False, err_vs_bound=0.1, xbackend_vs_bound=0.2, overhead=ms / 1.2 - 1))
            out.append(dict(base, scheme="full", backend=backend, implementation="triton" if backend == "torch"
                            else "pallas", ms=float("nan"), detected=False,
                            skipped=("triton" if backend == "torch" else "pallas") + ": no GPU"))
        out.append(dict(base, scheme="sdpa-cudnn", backend="torch", peer=True, ms=float("nan"), detected=False,
                        skipped="needs a GPU"))
    out[3]["detected"] = True  # a false positive: the table must say so
    from compare.merge import cross_check

    cross_check(out, {})
    return out


@pytest.mark.parametrize("columns", [80, 60, 120])
@pytest.mark.parametrize("wide", [False, True])
def test_no_table_line_is_wider_than_the_terminal(columns, wide, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", str(columns))
    table.render(_rows(), "preset=cpu dtype=float32 causal=False method=robust and a long title " * 2, wide=wide)
    text = capsys.readouterr().out
    assert text.strip()
    assert max(len(line) for line in text.splitlines()) <= columns
    assert "full" in text and "flagged" in text  # the false positive is named


def test_skipped_rows_fold_into_one_line_per_reason():
    rows = _rows()
    lines = table.lines(rows, width=200)
    skipped = [line for line in lines if line.startswith("skipped")]
    assert len(skipped) == 3  # triton: no GPU, pallas: no GPU, needs a GPU
    assert any("2 rows: needs a GPU" in line for line in skipped)
    assert not any(line.lstrip().startswith("sdpa-cudnn") for line in lines)  # not drawn one by one


def test_held_names_what_failed():
    assert table.held(dict(detected=False, err_vs_bound=0.5)) == "ok"
    assert table.held(dict(detected=True, err_vs_bound=1.5, xbackend_vs_bound=3)) == "flagged,error,backends"
    assert table.held(dict(peer=True, detected=False, err_vs_bound=9)) == "–"


def test_the_plot_has_few_series_per_panel_and_a_csv(tmp_path):
    rows = _rows()
    series = plots.relative_series(rows)
    assert set(series) == {"jax unfused", "torch unfused"}  # skipped fused rows draw nothing
    for panel in series.values():
        assert len(panel) == 4  # one line per scheme, peers are the reference
        for pts in panel.values():
            assert [p[0] for p in pts] == [64, 256]
            assert all(p[1] >= 1.0 for p in pts)  # relative to the fastest unprotected row
    full = series["torch unfused"]["full"]
    assert full[0][1] == pytest.approx(2.4 / 0.8)
    csv_path = plots.plot(rows, str(tmp_path / "plot.png"), "t")
    assert (tmp_path / "plot.png").stat().st_size > 5_000
    with open(csv_path) as f:
        got = list(csv.DictReader(f))
    assert len(got) == sum(1 for r in rows if not r.get("skipped"))
    assert {g["panel"] for g in got} >= {"jax unfused", "torch unfused"}


def test_pipelined_timer_reports_the_median_the_spread_and_the_dispatch():
    clock = iter(float(i) for i in range(10**6)).__next__  # every reading 1 s after the last
    calls = []
    out = timing.pipelined(lambda x: calls.append(x), [(1,), (2,)], sync=lambda r: None, warmup=2, reps=3,
                           calls=4, clock=clock)
    assert len(calls) == 2 + 3 * 4
    assert out["method"] == "pipelined" and out["calls_per_rep"] == 4 and len(out["times_ms"]) == 3
    # per repetition: 4 calls of 2 readings each plus the end reading: 9 s, per call 2.25 s
    assert out["ms"] == pytest.approx(2250.0) and out["dispatch_ms"] == pytest.approx(1000.0)
    assert out["iqr_ms"][0] <= out["ms"] <= out["iqr_ms"][1]
    with pytest.raises(ValueError, match="calls >= 1"):
        timing.pipelined(lambda: None, [()], sync=lambda r: None, calls=0)


def test_every_framework_has_one_protocol():
    assert timing.protocol("jax", True) == timing.protocol("jax", False) == "pipelined"
    assert timing.protocol("torch", True) == "cuda-events" and timing.protocol("torch", False) == "host"
    assert timing.quartiles([3.0]) == [3.0, 3.0]
    assert timing.quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == [2.0, 4.0]


def test_entry_point_lists_the_commands_and_dispatches(capsys):
    assert entry.main([]) == 0
    text = capsys.readouterr().out
    for command, _, _ in entry.COMMANDS:
        assert f"  {command}" in text
    assert entry.main(["nope"]) == 2
    assert "expected one of" in capsys.readouterr().err
    assert entry.main(["run", "--preset", "nope"]) == 2  # argparse's usage error passes through
    assert entry.main(["report", "--help"]) == 0


def test_report_reads_old_and_new_environments(tmp_path, capsys):
    assert results.gpu_of({"gpu": "NVIDIA H200"}) == "NVIDIA H200"
    assert results.gpu_of({"host": {"gpu": "NVIDIA H100"}}) == "NVIDIA H100"  # files of the old schema
    assert results.gpu_of({"backends": {"torch": {"device": "NVIDIA H200"}, "jax": {"device": "cpu"}}}) \
        == "NVIDIA H200"
    assert results.gpu_of({"backends": {"jax": {"device": "cpu"}}}) is None
    from compare import report

    doc = {"config": {}, "environment": {"host": {"gpu": "NVIDIA H100", "date": "2026-11-01"}}, "rows": _rows()}
    results.save(str(tmp_path / "results.json"), doc)
    assert report.main([str(tmp_path), "--no-plot"]) == 1  # a row with a false positive
    assert "on NVIDIA H100" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path / "missing")])
    assert e.value.code == 2
    assert math.isnan(results.load(str(tmp_path / "results.json"))["rows"][-1]["ms"])


def test_report_re_renders_a_fault_campaign(tmp_path, capsys):
    """A campaign's file has the common schema; its rows are the outcome map, drawn again."""
    import json

    from compare import report

    rows = [dict(backend="jax", dtype="float16", site="scores", bit=b, detected=d, harmless=h, below_limit=0,
                 missed=0, trials=d + h) for b, d, h in ((30, 4, 0), (12, 1, 3))]
    doc = results.document("faults", {"trials": 4}, {"jax": {"device": "cpu"}}, rows)
    doc["exit_status"] = 0
    (tmp_path / "faults.json").write_text(json.dumps(doc))
    assert report.main([str(tmp_path / "faults.json")]) == 0
    out = capsys.readouterr().out
    assert "detected 5 harmless 3 below_limit 0 missed 0" in out and "0 missed (≤" in out
    assert (tmp_path / "faults.png").stat().st_size > 5_000 and (tmp_path / "outcomes.csv").exists()
    doc["exit_status"] = 1
    (tmp_path / "faults.json").write_text(json.dumps(doc))
    assert report.main([str(tmp_path / "faults.json"), "--no-plot"]) == 1


@pytest.mark.parametrize("command", ["run", "train", "faults", "backward-faults", "report", "dropin", "calibrate"])
def test_every_command_has_help_with_defaults_and_exits_2_on_a_usage_error(command, capsys):
    assert entry.main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "usage: python -m compare." in text
    if command != "report":  # report's one option without a default is its path
        assert "(default:" in text
    assert entry.main([command, "--no-such-option"]) == 2
    assert "error:" in capsys.readouterr().err


def test_report_prints_a_kernel_benchmark_file(tmp_path, capsys):
    from compare import report

    doc = results.document("kernel-bench", {"seq": [64]}, {"torch": {"device": "NVIDIA H200"}},
                           [{"T": 64, "row": "triton kernel checks on", "ms": 0.25, "tflops": 1.5}])
    results.save(str(tmp_path / "k.json"), doc)
    assert report.main([str(tmp_path / "k.json")]) == 0
    out = capsys.readouterr().out
    assert "on NVIDIA H200" in out and "row=triton kernel checks on" in out and "ms=0.25" in out
