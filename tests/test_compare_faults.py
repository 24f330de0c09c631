"""A small seeded campaign of ``python -m compare.faults``, asserted against the issue's targets."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from ftattn_spec import masking

from .conftest import HAVE_JAX, HAVE_TORCH

pytestmark = pytest.mark.skipif(not (HAVE_JAX and HAVE_TORCH), reason="the campaign compares both backends")


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    from compare import faults

    out = tmp_path_factory.mktemp("faults")
    assert faults.main(["--trials", "1", "--dtype", "float16,float32", "--sites", "scores,probs,out,value",
                        "--clean", "40", "--seed", "5", "--out", str(out)]) == 0
    with open(out / "faults.json") as f:
        return json.load(f), out


def _assert_kernel_campaign(doc, impl: str, backend: str, sites) -> None:
    """A tiny bit-30 campaign through fused kernel ``impl`` of ``backend`` (the other backend unfused)."""
    summary = doc["summary"]
    assert summary["implementation"] == impl
    assert summary["compared_checks"] == ["qk_row", "softmax_dmr", "pv_row"]
    mine = summary["backends"][backend]
    assert mine["implementation"] == impl and not mine["locates"]
    assert mine["localization"] is None  # n/a: the kernel locates nothing
    assert {(s["dtype"], s["site"]) for s in mine["sites"]} == {("float16", s) for s in sites}
    assert len(doc["trials"]) == len(sites) and all(t["bit"] == 30 for t in doc["trials"])
    for trial in doc["trials"]:
        for name, res in trial["backends"].items():
            # an exponent flip at a protected site is never missed, and what is detected is corrected
            assert not (res["harmful"] and not res["detected"] and res["beyond_limit"]), (name, trial)
            assert "located" not in res or name != backend
            if res["detected"]:
                assert res["corrected"], (name, trial)
    for b in summary["backends"].values():
        assert b["missed_protected"] == 0 and b["clean"]["count"] == 0
    assert summary["agreement_outside_band"]["rate"] == 1.0


def test_campaign_meets_the_targets(campaign):
    doc, out = campaign
    summary = doc["summary"]
    for name in ("jax", "torch"):
        b = summary["backends"][name]
        assert b["missed_protected"] == 0
        assert b["clean"]["count"] == 0 and b["clean"]["of"] == 40
        assert b["localization"]["of"] > 20 and b["localization"]["rate"] >= 0.99
        assert b["correction"]["of"] > 40 and b["correction"]["rate"] >= 0.99
        sites = {(s["dtype"], s["site"]): s for s in b["sites"]}
        assert not sites[("float16", "value")]["protected"]
        for dtype in ("float16", "float32"):
            s = sites[(dtype, "scores")]
            assert s["trials"] == 32
            # every exponent flip of a logit far from zero is caught; the low mantissa bits are harmless,
            # and the detection rate counts only the faults that mattered (harmless ones left out)
            assert s["missed"] == 0 and s["harmless"] > 0 and s["detection"]["of"] == s["trials"] - s["harmless"]
            assert s["detection"]["rate"] == 1.0
            lo, hi = s["detection"]["ci95"]
            assert lo <= s["detection"]["rate"] <= hi
    assert summary["agreement_outside_band"]["rate"] == 1.0  # flags differ only by rounding near a threshold
    assert summary["agreement"]["rate"] >= 0.99
    assert (out / "faults.png").stat().st_size > 10_000


def test_same_plan_same_trials():
    from compare import faults

    a = faults.plan_trials(["scores", "key"], ["bfloat16"], 2, 9, faults.DEFAULT_SHAPE, "full")
    b = faults.plan_trials(["scores", "key"], ["bfloat16"], 2, 9, faults.DEFAULT_SHAPE, "full")
    assert a == b and len(a) == 2 * (32 + 16)
    assert len({t["seed"] for t in a}) == len(a)


def test_wilson_interval():
    from ftattn_spec.faults import wilson_interval

    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and 0.27 < hi < 0.28  # the textbook value 0.2775
    lo, hi = wilson_interval(50, 100)
    assert np.isclose(lo, 0.4038, atol=1e-3) and np.isclose(hi, 0.5962, atol=1e-3)


def test_causal_trials_run_causal():
    """A fault in a masked score (key after the query) cannot matter in a causal run."""
    from compare import backends, faults

    bks = [backends.make_backend("jax"), backends.make_backend("torch")]
    trial = dict(dtype="float16", site="scores", bit=30, index=(0, 1, 3, 20), dist="normal", seed=3)
    row = faults.run_trial(trial, bks, "full", faults.DEFAULT_SHAPE, is_causal=True)
    for res in row["backends"].values():
        assert not res["detected"] and not res["harmful"]
    row = faults.run_trial(dict(trial, index=(0, 1, 20, 3)), bks, "full", faults.DEFAULT_SHAPE, is_causal=True)
    for res in row["backends"].values():
        assert res["detected"] and res["located"] and res["corrected"]


@pytest.mark.parametrize("mask", ["padding", "window", "random"])
def test_masked_trials_run_under_the_mask(mask):
    """Under ``--mask``, a fault in a masked score is harmless and one in an attended score is
    detected, located and corrected, in both backends alike."""
    from compare import backends, faults

    bks = [backends.make_backend("jax"), backends.make_backend("torch")]
    shape = faults.DEFAULT_SHAPE
    seed = 5
    allowed = masking.allowed(shape["B"], shape["N"], shape["T"], shape["S"],
                              **_masking_kwargs(faults.mask_kwargs(mask, shape, seed)))
    b, n = 1, 2
    masked = np.argwhere(~allowed[b, n])
    attended = np.argwhere(allowed[b, n])
    assert len(masked) and len(attended)
    trial = dict(dtype="float32", site="scores", bit=30, dist="normal", seed=seed)
    row = faults.run_trial(dict(trial, index=(b, n, *masked[0])), bks, "full", shape, False, mask)
    for name, res in row["backends"].items():
        assert not res["detected"] and not res["harmful"], (name, mask, masked[0], res)
    row = faults.run_trial(dict(trial, index=(b, n, *attended[-1])), bks, "full", shape, False, mask)
    assert row["agree_flags"]
    for res in row["backends"].values():
        assert res["detected"] and res["located"] and res["corrected"]


def _masking_kwargs(kw):
    return dict(mask=kw.get("mask"), window=kw.get("local_window_size"), key_lengths=kw.get("key_value_seq_lengths"))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Triton's interpreter on NumPy 2
def test_triton_campaign(tmp_path, capsys):
    """``--implementation triton``: the fused kernel against JAX unfused, on a tiny campaign at
    bit 30 (on a CPU through Triton's interpreter, which tests/conftest.py selects)."""
    from compare import faults

    assert faults.main(["--implementation", "triton", "--trials", "1", "--bits", "30", "--dtype", "float16,float32",
                        "--sites", "scores,probs,out", "--clean", "1", "--seed", "5",
                        "--out", str(tmp_path)]) == 0
    text = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "torch triton" in text and "torch [triton]: faults by site" in text and "jax [unfused]" in text
    assert "float32 left out" in text and "n/a (triton locates nothing)" in text
    doc = json.loads((tmp_path / "faults.json").read_text())
    assert doc["config"]["implementation"] == "triton" and doc["config"]["dtypes"] == ["float16"]
    assert doc["config"]["implementations"] == {"jax": "unfused", "torch": "triton"}
    _assert_kernel_campaign(doc, "triton", "torch", ("scores", "probs", "out"))


@pytest.mark.parametrize("argv,match", [
    (["--dtype", "float32"], "--dtype"), (["--scheme", "abft_qk_col"], "--scheme"),
    (["--backends", "jax"], "--implementation"),
])
def test_triton_campaign_refuses_what_the_kernel_cannot_run(argv, match):
    from compare import faults

    with pytest.raises(SystemExit, match=match):
        faults.main(["--implementation", "triton", *argv])


@pytest.mark.parametrize("implementation,mask", [("pallas", "padding"),
                                                  pytest.param("triton", "window", marks=pytest.mark.slow)])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Triton's interpreter on NumPy 2
def test_fused_campaign_under_a_mask(implementation, mask, tmp_path):
    """The fused kernels take every mask form, so a masked campaign runs on them and agrees."""
    if implementation == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton")
    from compare import faults

    assert faults.main(["--implementation", implementation, "--mask", mask, "--trials", "1", "--bits", "30",
                        "--dtype", "float16", "--sites", "scores,probs,out", "--clean", "1", "--seed", "7",
                        "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "faults.json").read_text())
    assert doc["config"]["implementation"] == implementation and doc["summary"]["agreement"]["rate"] == 1.0


def test_pallas_campaign(tmp_path, capsys):
    """``--implementation pallas``: JAX's fused kernel against PyTorch unfused, on a tiny campaign at
    bit 30 (on a CPU in Pallas' interpret mode, which the kernel picks by itself)."""
    import jax

    from compare import faults

    assert faults.main(["--implementation", "pallas", "--trials", "1", "--bits", "30", "--dtype", "float16,float32",
                        "--sites", "scores,probs,probs.replica,out", "--clean", "1", "--seed", "5",
                        "--out", str(tmp_path)]) == 0
    text = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "jax pallas" in text and "jax [pallas]: faults by site" in text and "torch [unfused]" in text
    assert "float32 left out" in text and "n/a (pallas locates nothing)" in text
    doc = json.loads((tmp_path / "faults.json").read_text())
    assert doc["config"]["implementation"] == "pallas" and doc["config"]["dtypes"] == ["float16"]
    assert doc["config"]["implementations"] == {"jax": "pallas", "torch": "unfused"}
    env = doc["environment"]["backends"]["jax"]  # the schema of every compare command
    assert env["implementation"] == "pallas" and env["jax"]
    assert env["pallas_interpret"] == ("1" if jax.default_backend() != "gpu" else "")
    summary = doc["summary"]
    _assert_kernel_campaign(doc, "pallas", "jax", ("scores", "probs", "probs.replica", "out"))
    assert summary["agreement"]["rate"] == 1.0


@pytest.mark.parametrize("argv,match", [
    (["--dtype", "float32"], "--dtype"), (["--scheme", "abft_qk_col"], "--scheme"),
    (["--backends", "torch"], "--implementation"),
])
def test_pallas_campaign_refuses_what_the_kernel_cannot_run(argv, match):
    from compare import faults

    with pytest.raises(SystemExit, match=match):
        faults.main(["--implementation", "pallas", *argv])


def test_implementation_runs_on_its_own_backend():
    from compare import fault_options

    assert fault_options.backend_implementations("pallas", ["jax", "torch"]) == {"jax": "pallas", "torch": "unfused"}
    assert fault_options.backend_implementations("triton", ["jax", "torch"]) == {"jax": "unfused", "torch": "triton"}
    assert fault_options.backend_implementations("unfused", ["torch"]) == {"torch": "unfused"}


def test_bits_option():
    from compare import faults

    assert faults._parse_bits("30,0-2") == {0, 1, 2, 30} and faults._parse_bits(None) is None
    with pytest.raises(SystemExit, match="--bits"):
        faults._parse_bits("40")
    trials = faults.plan_trials(["scores", "key"], ["float16"], 1, 0, faults.DEFAULT_SHAPE, "full", {3, 30})
    assert [(t["site"], t["bit"]) for t in trials] == [("scores", 3), ("scores", 30), ("key", 3)]


def test_fault_models_option():
    """``--model``: the trials of a stuck-at model keep the sites it can corrupt, and a trial's
    faults are its model's, the same each time they are drawn; the backends agree on a stuck row."""
    from compare import backends, faults

    trials = faults.plan_trials(["scores", "key", "out"], ["float16"], 1, 0, faults.DEFAULT_SHAPE, "full", {30},
                                model="stuck_row")
    assert [(t["site"], t["model"]) for t in trials] == [("scores", "stuck_row"), ("out", "stuck_row")]
    f1, f2 = faults._faults(trials[0]), faults._faults(trials[0])
    assert f1 == f2 and f1[0].stuck in (0, 1) and f1[0].index[3] is None and f1[0].index[:3] == trials[0]["index"][:3]
    multi = faults.plan_trials(["probs"], ["float32"], 1, 0, faults.DEFAULT_SHAPE, "full", {30}, model="multi_bit")
    bits = [f.bit for f in faults._faults(multi[0])]
    assert 2 <= len(bits) <= 4 and bits[0] == 30 and len(set(bits)) == len(bits)
    bks = [backends.make_backend("jax"), backends.make_backend("torch")]
    row = faults.run_trial(dict(trials[0], dist="normal"), bks, "full", faults.DEFAULT_SHAPE, is_causal=False)
    assert row["agree"] and all(r["detected"] or not r["harmful"] for r in row["backends"].values())
    with pytest.raises(SystemExit):
        faults.main(["--model", "cosmic"])
