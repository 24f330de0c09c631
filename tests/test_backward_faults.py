"""``python -m compare.backward_faults``: a small campaign through both fused backwards
(interpreted on the CPU) detects what harms the gradients and flags no clean run."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")
pytest.importorskip("jax")

from compare import backward_faults  # noqa: E402


def test_small_campaign_misses_nothing(tmp_path):
    if os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("FTATTN_TEST_TORCH_DEVICE") != "cuda":
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1")
    rc = backward_faults.main(["--dtype", "float16", "--sites", "bwd_dv,bwd_ds", "--bits", "27", "--clean", "1",
                               "--out", str(tmp_path)])
    data = json.loads((tmp_path / "backward_faults.json").read_text())
    faults = [r for r in data["results"] if r["kind"] == "fault"]
    clean = [r for r in data["results"] if r["kind"] == "clean"]
    assert rc == 0
    assert {r["backend"] for r in faults} == {"torch", "jax"}
    assert {(r["site"], r["replica"]) for r in faults} == {("bwd_dv", 0), ("bwd_ds", 0), ("bwd_ds", 1)}
    assert len(clean) == 2 and not any(r["detected"] for r in clean)
    assert not any(r["outcome"] == "missed" for r in faults)
    assert any(r["outcome"] == "detected" for r in faults)


@pytest.mark.parametrize("argv", [["--sites", "scores"], ["--bits", "40"], ["--dtype", "float32"], ["--nope"]])
def test_usage_errors_exit_2(argv):
    assert backward_faults.main(argv) == 2
