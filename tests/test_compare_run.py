"""``python -m compare.run`` on CPU: JSON, cross-checks, report, timing methods, bad input."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import pytest

from compare import peers, report, results, run, timing
from ftattn_spec.schemes import SCHEME_NAMES
from ftattn_spec.shapes import PRESETS, Shape

from .conftest import HAVE_JAX, HAVE_TORCH


@pytest.mark.skipif(not (HAVE_JAX and HAVE_TORCH), reason="compares both backends")
def _assert_skipped_without_gpu(rows, impl: str) -> None:
    """A fused kernel's rows on a machine without a GPU: none timed, each skipped with its reason."""
    for r in rows:
        assert r["ms"] != r["ms"] and r["detected"] is False and "flags" not in r  # NaN: not timed
        if r["scheme"] == "abft_qk_col":  # the kernel runs no column check, GPU or not
            assert r["skipped"].startswith(f"{impl}: runs none of the checks of abft_qk_col")
        else:
            assert r["skipped"] == f"{impl}: no GPU"


def test_cpu_preset_writes_every_row_and_renders(tmp_path, capsys):
    assert run.main(["--preset", "cpu", "--out", str(tmp_path), "--reps", "2", "--warmup", "1",
                     "--input-sets", "2"]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    shapes = [s.label() for s in PRESETS["cpu"]]
    peer_rows = [r for r in doc["rows"] if r.get("peer")]
    rows = [r for r in doc["rows"] if not r.get("peer") and r["implementation"] == "unfused"]
    triton_rows = [r for r in doc["rows"] if r.get("implementation") == "triton"]
    assert {(r["shape"], r["scheme"]) for r in triton_rows} == {(s, scheme) for s in shapes for scheme in SCHEME_NAMES}
    assert all(r["backend"] == "torch" and r["skipped"] for r in triton_rows)  # no GPU: skipped with a reason
    pallas_rows = [r for r in doc["rows"] if r.get("implementation") == "pallas"]
    assert {(r["shape"], r["scheme"]) for r in pallas_rows} == {(s, scheme) for s in shapes for scheme in SCHEME_NAMES}
    assert all(r["backend"] == "jax" and r["skipped"] for r in pallas_rows)  # no GPU: skipped with a reason
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
    assert doc["schema"] == results.SCHEMA and doc["command"] == "run"
    assert set(doc["environment"]["backends"]) == {"jax", "torch"} and doc["environment"]["date"]
    assert doc["config"]["dtype"] == "float32"  # on a CPU: the dtype at which the jax.nn peer runs
    assert all(r["ms"] > 0 for r in peer_rows if r["scheme"] == "jax-xla")
    assert all(r["skipped"] == "needs a GPU" for r in peer_rows if r["scheme"] in peers.GPU_ONLY)
    assert doc["config"]["isolate"] == "auto"  # two backends: one process each
    assert (tmp_path / "plot.png").stat().st_size > 10_000 and (tmp_path / "plot.csv").stat().st_size > 100
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
    (["--implementations", "unfused,fused"], "--implementations"),
    (["--implementations", "unfused,pallas,cuda"], "--implementations"),
])
def test_bad_arguments_exit_with_a_message(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        run.main(argv)
    assert e.value.code == 2  # a usage error, not a failed check
    assert match in capsys.readouterr().err


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


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_implementations_option_and_triton_rows_skipped_without_a_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the triton rows run")
    args = argparse.Namespace(implementations="unfused,triton")
    assert run._implementations(args, "torch") == ["unfused", "triton"]
    assert run._implementations(args, "jax") == ["unfused"]  # triton is PyTorch's only
    assert run._implementations(argparse.Namespace(implementations="triton"), "jax") == []
    argv = ["--preset", "cpu", "--backends", "torch", "--schemes", "baseline,abft_qk_col,full", "--no-peers",
            "--reps", "1", "--warmup", "0", "--input-sets", "1"]
    assert run.main(argv + ["--out", str(tmp_path / "both")]) == 0
    out = capsys.readouterr().out
    assert "triton rows skipped: triton: no GPU" in out and "[triton]" in out
    doc = results.load(str(tmp_path / "both" / "results.json"))  # null back to NaN
    assert doc["config"]["implementations"] == "unfused,triton,pallas"  # the default
    shapes = [s.label() for s in PRESETS["cpu"]]
    triton_rows = [r for r in doc["rows"] if r["implementation"] == "triton"]
    assert {(r["shape"], r["scheme"]) for r in triton_rows} == {
        (s, scheme) for s in shapes for scheme in ("baseline", "abft_qk_col", "full")}
    _assert_skipped_without_gpu(triton_rows, "triton")
    assert all(r["ms"] > 0 and "skipped" not in r for r in doc["rows"] if r["implementation"] == "unfused")
    assert run.main(argv + ["--implementations", "unfused", "--out", str(tmp_path / "unfused")]) == 0
    doc = json.loads((tmp_path / "unfused" / "results.json").read_text())
    assert {r["implementation"] for r in doc["rows"]} == {"unfused"}
    assert "[triton]" not in capsys.readouterr().out


@pytest.mark.skipif(not (HAVE_JAX and HAVE_TORCH and importlib.util.find_spec("triton") is not None
                         and os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs jax, torch, triton and TRITON_INTERPRET=1 (set by tests/conftest.py without a GPU)")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Triton's interpreter on NumPy 2
def test_triton_rows_labelled_and_cross_checked(tmp_path, monkeypatch, capsys):
    """The triton rows' code path on a CPU, through Triton's interpreter on one tiny shape."""
    monkeypatch.setattr(run, "TRITON_ON_CPU", True)
    monkeypatch.setattr(run, "preset", lambda name: (Shape(1, 4, 40, 24, 16, K=2),))
    assert run.main(["--preset", "cpu", "--schemes", "baseline,abft_qk_col,full", "--no-peers", "--isolate", "none",
                     "--implementations", "unfused,triton", "--dtype", "float16", "--reps", "1", "--warmup", "0", "--input-sets", "1",
                     "--out", str(tmp_path)]) == 0
    assert "[triton]" in capsys.readouterr().out  # the table labels the rows ("full [triton]", maybe wrapped)
    rows = {(r["backend"], r["scheme"], r["implementation"]): r
            for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert set(rows) == {(b, s, "unfused") for b in ("jax", "torch") for s in ("baseline", "abft_qk_col", "full")} | {
        ("torch", s, "triton") for s in ("baseline", "abft_qk_col", "full")}
    assert rows[("torch", "abft_qk_col", "triton")]["skipped"]
    full = rows[("torch", "full", "triton")]
    assert full["flags"] == {"qk_row": False, "softmax_dmr": False, "pv_row": False} and full["detected"] is False
    assert full["verdicts_agree"] is True and full["verdicts_compared"] == ["qk_row", "softmax_dmr", "pv_row"]
    assert full["err_vs_bound"] <= 1 and full["xbackend_vs_bound"] <= 2  # against JAX unfused
    assert rows[("torch", "baseline", "triton")]["flags"] == {} and full["overhead"] == full["overhead"]
    assert rows[("jax", "full", "unfused")]["verdicts_agree"] is True  # still against torch unfused
    assert "verdicts_compared" not in rows[("jax", "full", "unfused")]


def _pallas_rows_on_cpu():
    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present: the pallas rows run")


TINY = (Shape(1, 4, 40, 24, 16, K=2),)  # T != S, grouped-query, H = 16: the Pallas kernel's smallest head dim


@pytest.mark.skipif(not HAVE_JAX, reason="needs jax")
def test_pallas_implementation_option_and_rows_skipped_without_a_gpu(tmp_path, monkeypatch, capsys):
    _pallas_rows_on_cpu()
    args = argparse.Namespace(implementations="unfused,triton,pallas")
    assert run._implementations(args, "jax") == ["unfused", "pallas"]
    assert run._implementations(args, "torch") == ["unfused", "triton"]  # pallas is JAX's only
    assert run._implementations(argparse.Namespace(implementations="pallas"), "torch") == []
    monkeypatch.setattr(run, "preset", lambda name: TINY)
    argv = ["--preset", "cpu", "--backends", "jax", "--schemes", "baseline,abft_qk_col,full", "--no-peers",
            "--reps", "1", "--warmup", "0", "--input-sets", "1"]
    assert run.main(argv + ["--out", str(tmp_path / "both")]) == 0
    out = capsys.readouterr().out
    assert "pallas rows skipped: pallas: no GPU" in out and "[pallas]" in out
    doc = results.load(str(tmp_path / "both" / "results.json"))
    assert doc["config"]["implementations"] == "unfused,triton,pallas"
    pallas_rows = [r for r in doc["rows"] if r["implementation"] == "pallas"]
    assert {(r["scheme"], r["backend"]) for r in pallas_rows} == {
        (scheme, "jax") for scheme in ("baseline", "abft_qk_col", "full")}
    _assert_skipped_without_gpu(pallas_rows, "pallas")
    assert all(r["ms"] > 0 and "skipped" not in r for r in doc["rows"] if r["implementation"] == "unfused")
    assert run.main(argv + ["--implementations", "unfused,triton", "--out", str(tmp_path / "unfused")]) == 0
    doc = json.loads((tmp_path / "unfused" / "results.json").read_text())
    assert {r["implementation"] for r in doc["rows"]} == {"unfused"}
    assert "[pallas]" not in capsys.readouterr().out


@pytest.mark.skipif(not (HAVE_JAX and HAVE_TORCH), reason="needs jax and torch")
def test_pallas_rows_labelled_and_cross_checked(tmp_path, monkeypatch, capsys):
    """The pallas rows' code path on a CPU, in Pallas' interpret mode on one tiny shape,
    cross-checked against PyTorch's unfused rows."""
    monkeypatch.setattr(run, "PALLAS_ON_CPU", True)
    monkeypatch.setattr(run, "preset", lambda name: TINY)
    assert run.main(["--preset", "cpu", "--schemes", "baseline,abft_qk_col,full", "--no-peers", "--isolate", "none",
                     "--implementations", "unfused,pallas", "--dtype", "float16", "--reps", "1", "--warmup", "0", "--input-sets", "1",
                     "--out", str(tmp_path)]) == 0
    assert "[pallas]" in capsys.readouterr().out  # the table labels the rows ("full [pallas]", maybe wrapped)
    doc = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["backend"], r["scheme"], r["implementation"]): r for r in doc["rows"]}
    assert {r.get("lowering") for r in doc["rows"] if r["implementation"] == "pallas"} == {"triton"}  # portable
    assert set(rows) == {(b, s, "unfused") for b in ("jax", "torch") for s in ("baseline", "abft_qk_col", "full")} | {
        ("jax", s, "pallas") for s in ("baseline", "abft_qk_col", "full")}
    assert rows[("jax", "abft_qk_col", "pallas")]["skipped"].startswith("pallas: runs none of the checks")
    full = rows[("jax", "full", "pallas")]
    assert full["flags"] == {"qk_row": False, "softmax_dmr": False, "pv_row": False} and full["detected"] is False
    assert full["verdicts_agree"] is True and full["verdicts_compared"] == ["qk_row", "softmax_dmr", "pv_row"]
    assert full["err_vs_bound"] <= 1 and full["xbackend_vs_bound"] <= 2  # against PyTorch unfused
    assert rows[("jax", "baseline", "pallas")]["flags"] == {} and full["overhead"] == full["overhead"]
    assert rows[("torch", "full", "unfused")]["verdicts_agree"] is True  # still against JAX unfused
    assert "verdicts_compared" not in rows[("torch", "full", "unfused")]


def test_compare_train_runs_on_a_cpu(tmp_path, capsys):
    """``python -m compare.train`` times forward plus backward for both frameworks; on a CPU it
    takes the unfused path and says so; its rows share compare.run's schema and table."""
    from compare import train

    assert train.main(["--T", "24", "--N", "3", "--H", "8", "--reps", "2", "--warmup", "1",
                       "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no GPU" in out and "F.sdpa" in out and "jax.nn" in out
    doc = results.load(str(tmp_path / "results.json"))
    assert doc["command"] == "train" and doc["schema"] == results.SCHEMA
    rows = doc["rows"]
    assert {(r["backend"], r["scheme"]) for r in rows} == {
        ("torch", "F.sdpa"), ("torch", "baseline"), ("torch", "full"),
        ("jax", "jax.nn"), ("jax", "baseline"), ("jax", "full")}
    assert all(r["pass"] == "fwd+bwd" and r["ms"] > 0 and r["vs_fastest_unprotected"] > 0 for r in rows)
    assert {r["protocol"] for r in rows} == {"host", "pipelined"}
    assert all(r["iqr_ms"][0] <= r["ms"] <= r["iqr_ms"][1] for r in rows)
    assert report.main([str(tmp_path), "--no-plot"]) == 0


@pytest.mark.skipif(not (HAVE_JAX and HAVE_TORCH), reason="both frameworks")
def test_training_rows_share_the_table_json_and_plot(tmp_path, monkeypatch, capsys):
    """``--train``: forward plus backward rows at each shape, in the same results file, table and
    plot as the forward rows (their own plot panels)."""
    from compare import plots

    monkeypatch.setattr(run, "preset", lambda name: (Shape(1, 2, 24, 24, 8),))
    assert run.main(["--preset", "cpu", "--schemes", "baseline,full", "--no-peers", "--isolate", "none",
                     "--implementations", "unfused", "--reps", "1", "--warmup", "0", "--input-sets", "1",
                     "--train", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "(fwd+bwd)" in out
    rows = results.load(str(tmp_path / "results.json"))["rows"]
    train_rows = [r for r in rows if r.get("pass") == "fwd+bwd"]
    assert {(r["backend"], r["scheme"]) for r in train_rows} == {
        ("torch", "F.sdpa"), ("torch", "baseline"), ("torch", "full"),
        ("jax", "jax.nn"), ("jax", "baseline"), ("jax", "full")}
    assert all(r["ms"] > 0 for r in train_rows)
    panels = set(plots.relative_series(rows))
    assert {"torch unfused (fwd+bwd)", "jax unfused (fwd+bwd)", "torch unfused", "jax unfused"} <= panels
