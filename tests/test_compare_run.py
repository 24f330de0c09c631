"""``python -m compare.run`` on CPU: JSON, cross-checks, report, timing methods, bad input."""

from __future__ import annotations

import json

import pytest

from compare import peers, report, results, run, timing
from ftattn_spec.schemes import SCHEME_NAMES
from ftattn_spec.shapes import PRESETS, Shape

from .conftest import HAVE_JAX, HAVE_TORCH


@pytest.mark.skipif(not (HAVE_JAX and HAVE_TORCH), reason="compares both backends")
def test_cpu_preset_writes_every_row_and_renders(tmp_path, capsys):
    assert run.main(["--preset", "cpu", "--out", str(tmp_path), "--reps", "2", "--warmup", "1",
                     "--input-sets", "2"]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    shapes = [s.label() for s in PRESETS["cpu"]]
    peer_rows = [r for r in doc["rows"] if r.get("peer")]
    rows = [r for r in doc["rows"] if not r.get("peer")]
    assert {(r["shape"], r["scheme"], r["backend"]) for r in rows} == {
        (s, scheme, b) for s in shapes for scheme in SCHEME_NAMES for b in ("jax", "torch")}
    assert {r["scheme"] for r in peer_rows} == set(peers.TORCH_PEERS + peers.JAX_PEERS)
    math_rows = [r for r in peer_rows if r["scheme"] == "sdpa-math"]
    assert len(math_rows) == len(shapes) and all(r["ms"] > 0 and r["err_vs_bound"] <= 1 for r in math_rows)
    assert all(r["skipped"] for r in peer_rows if r["scheme"] == "jax-cudnn")  # no GPU: skipped with a reason
    for r in rows:
        assert r["ms"] > 0 and r["tflops"] > 0 and r["first_call_ms"] > 0
        assert r["err_vs_bound"] <= 1 and r["xbackend_vs_bound"] <= 2
        assert r["detected"] is False and r["verdicts_agree"] is True
        assert r["vs_fastest_unprotected"] > 0
    assert set(doc["environment"]) == {"host", "jax", "torch"}
    assert doc["config"]["isolate"] == "auto"  # two backends: one process each
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    capsys.readouterr()
    assert report.main([str(tmp_path), "--no-plot"]) == 0
    assert "full" in capsys.readouterr().out


def test_tflops_formula():
    s = Shape(B=2, N=3, T=5, S=7, H=11)
    assert s.flops() == 4 * 2 * 3 * 5 * 7 * 11
    assert s.flops(is_causal=True) == s.flops() / 2
    assert run.tflops(2e12, 1000.0) == pytest.approx(2.0)  # 2e12 flops in one second


class FakeTimer:
    """A clock that advances only when the timed function runs: the first call costs
    ``first`` ms (start-up), every later one ``steady`` ms."""

    def __init__(self, first=16.6, steady=2.26):
        self.now, self.calls, self.first, self.steady = 0.0, 0, first, steady

    def fn(self, *args):
        self.now += self.first if self.calls == 0 else self.steady
        self.calls += 1
        return self.now

    def start(self):
        return self.now

    def stop(self, marker, result):
        return self.now - marker

    def sync(self, result):
        pass


def test_notebook_method_includes_start_up_and_robust_does_not():
    t = FakeTimer()
    nb = timing.notebook(t.fn, [()], t)
    assert nb["ms"] == pytest.approx((16.6 + 9 * 2.26) / 10)
    t = FakeTimer()
    rb = timing.robust(t.fn, [()], t, warmup=3, reps=10)
    assert rb["ms"] == pytest.approx(2.26) and len(rb["times_ms"]) == 10


def test_notebook_loop_order_charges_start_up_to_the_first_length():
    t = FakeTimer()
    made = []
    means = timing.notebook_loop_order({512: t.fn, 1024: t.fn}, lambda n: made.append(n) or (), t, iters=10)
    assert made == [512, 1024] * 10  # fresh inputs for every call, lengths inside iterations
    assert means[512] == pytest.approx((16.6 + 9 * 2.26) / 10) and means[1024] == pytest.approx(2.26)


@pytest.mark.parametrize("argv,match", [
    (["--preset", "nope"], "--preset"), (["--schemes", "full,fast"], "--schemes"),
    (["--backends", "tf"], "--backends"), (["--dtype", "float64"], "--dtype"),
    (["--method", "best"], "--method"), (["--reps", "0"], "--reps"),
])
def test_bad_arguments_exit_with_a_message(argv, match):
    with pytest.raises(SystemExit, match=match):
        run.main(argv)


def test_results_json_round_trip(tmp_path):
    rows = [dict(shape="B=1", T=8, S=8, scheme="baseline", backend="jax", ms=float("nan"), tflops=float("nan"),
                 overhead=float("nan"), err_vs_bound=float("nan"), detected=False, oom=True)]
    results.save(str(tmp_path / "r.json"), {"config": {}, "environment": {}, "rows": rows})
    doc = results.load(str(tmp_path / "r.json"))
    assert doc["rows"][0]["oom"] and doc["rows"][0]["ms"] != doc["rows"][0]["ms"]  # NaN survives as null
    with pytest.raises(ValueError, match="results file"):
        (tmp_path / "bad.json").write_text("{}")
        results.load(str(tmp_path / "bad.json"))


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_notebook_method_adds_the_loop_order_rows(tmp_path):
    assert run.main(["--preset", "cpu", "--backends", "torch", "--schemes", "baseline", "--method", "notebook",
                     "--no-peers", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"notebook", "notebook-loop-order"}
    loop = [r for r in rows if r["method"] == "notebook-loop-order"]
    assert len(loop) == len(PRESETS["cpu"]) and all(r["ms"] > 0 and "xbackend_vs_bound" not in r for r in loop)
    assert json.loads((tmp_path / "results.json").read_text())["config"]["isolate"] == "auto"
