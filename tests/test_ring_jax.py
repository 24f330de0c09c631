"""Ring attention in JAX (``ftattn_jax.sharding.ring_attention``) on 4 host devices, in a process of
its own (``tests/ring_jax_worker.py``; the device count is fixed when jax starts): the output equals
float64 attention as closely as the single-device path does, nothing clean is flagged, a fault at
every ring site is detected at its device and step and located to its row, one compilation serves
every fault, gradients equal the single-device ones, and bad input is refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ftattn_spec import ring
from ftattn_spec.ring import RingFault
from ftattn_spec import ring_fused_backward as spec_ring_fused_backward
from tests.ring_cases import BACKWARD_CASES, FUSED_BACKWARD_CASES

WORKER = os.path.join(os.path.dirname(__file__), "ring_jax_worker.py")
U = 2.0**-24


def _run(part: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, WORKER, part], capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def result() -> dict:
    return _run("core")


@pytest.fixture(scope="module")
def backward() -> dict:
    return _run("backward")


@pytest.fixture(scope="module")
def fused() -> dict:
    return _run("fused")


def test_ring_matches_float64_and_flags_nothing_clean(result):
    assert result["devices"] == 4
    assert len(result["clean"]) == 13
    assert {c["dtype"] for c in result["clean"]} == {"float32", "bfloat16", "float16"}
    for c in result["clean"]:
        what = (c["dtype"], c["causal"], c["scheme"], c["scale"])
        assert not c["detected"], what
        assert max(c["worst"].values()) < 1.0, (what, c["worst"])
        assert c["out_dtype"] == c["dtype"], what
        assert c["out_spec"] in ("P(None, 'seq')", "P(None, 'seq', None, None)"), what
        # the ring's error against float64 stays within a small multiple of the single-device path's,
        # plus what its merges add: weights exp(lse − L) whose arguments are rounded at |L| ≤ μ + ln S
        merge = 16 * U * (c["mu"] + 3.0) * c["ref_max"]
        assert c["err"] <= 4 * c["single_err"] + merge, (what, c["err"], c["single_err"], merge)
        if c["scheme"] != "baseline":
            assert c["row_specs"] == ["P(None, None, 'seq')"], what


def test_ring_faults_detected_at_their_device_and_step(result):
    assert len(result["faults"]) == 15
    for f in result["faults"]:
        what = (f["site"], f["scheme"])
        assert f["detected"], what
        assert f["flagged"][f["check"]] >= 1, (what, f["flagged"])
        first = min((s for d, s in f["steps"] if d == f["device"]), default=None)
        assert first == f["step"], (what, f["steps"])
        assert all(d == f["device"] for d, _ in f["steps"]), (what, f["steps"])
        if f["where"] is not None:  # a row check names the global (b, n, t) of the fault
            assert f["where"] == f["index"][:3], what
    assert result["compiled_before"] >= 1  # the entry the faults above compiled (not a fresh one)
    assert result["compilations"] == 0  # two more faults of the same count: no new compilation
    assert result["jit_detected"]
    assert result["raised"]


def test_ring_gradients_equal_single_device(result):
    assert max(result["grad_diff"]) < 1e-5, result["grad_diff"]
    assert result["tally"]["ring grads (backward)"][:2] == [1, 0], result["tally"]  # checked, and clean


def _fused_clean_within_bounds(found: dict) -> None:
    """Errors within 2·P times the one-device kernel's (each block rounded to the input dtype
    before its merge), nothing flagged, gradients within 4× plain attention's in the same dtype."""
    for c in found["clean"]:
        what = (c["dtype"], c["causal"])
        assert c["ran"] == "pallas" and not c["detected"] and c["worst"] < 1.0, (what, c)
        assert c["err"] <= 8 * c["single_err"], (what, c)
        for got, plain in zip(c["grad_err"], c["grad_plain"]):
            assert got <= 4 * plain, (what, c["grad_err"], c["grad_plain"])
    assert found["tally"]["ring fused"][:2] == [len(found["clean"]), 0]
    assert found["tally"]["ring fused (backward)"][:2] == [len(found["clean"]), 0]  # the checked backward, clean


def test_ring_of_fused_blocks(fused):
    """The portable Pallas kernel's blocks (interpreted), causal bfloat16: output and gradients
    (``ring_local``'s too) within bounds, every fault but ``lse`` at its device and step."""
    fz = fused
    _fused_clean_within_bounds(fz)
    for got, plain in zip(fz["local_grad_err"], fz["local_grad_plain"]):  # ring_local's (fused) backward
        assert got <= 4 * plain, (fz["local_grad_err"], fz["local_grad_plain"])
    for f in fz["faults"]:
        assert f["detected"] and f["flagged"][f["check"]] >= 1, f
        assert all(d == f["device"] for d, _ in f["steps"]) and min(s for _, s in f["steps"]) == f["step"], f
    assert fz["auto"][0] == "unfused" and "not on a GPU" in fz["auto"][1]
    e = fz["errors"]
    assert e["lse"].startswith("ValueError: fault.site: 'lse'"), e
    assert e["float32"].startswith("TypeError: query:"), e
    assert e["name"].startswith("ValueError: implementation:"), e


@pytest.mark.slow
def test_ring_of_fused_blocks_float16_not_causal():
    _fused_clean_within_bounds(_run("fused_float16"))


def test_ring_fused_backward_faults(fused):
    """After fused blocks the backward is the fused kernels' (one launch per step): each fault of
    ``FUSED_BACKWARD_CASES`` counted under its site's ``(backward)``, first flagged at its device
    and step by that device alone (a corrupted accumulator stays so on the devices after it), and
    named by its check on the device that owns the row or key; one compilation for the four."""
    t, bw = fused["tally"], fused["backward"]
    assert len(bw["located"]) == len(FUSED_BACKWARD_CASES) == 4
    n = len(FUSED_BACKWARD_CASES)
    assert t["ring fused bwd"][:2] == [n, 0] and t["ring fused bwd (backward)"][:2] == [n, n], t
    assert bw["counted"] == [[0, i + 1] for i in range(n)], bw["counted"]  # each fault counted by its call
    for (f, device, step, check), got in zip(FUSED_BACKWARD_CASES, bw["located"]):
        first = min(s for _, s in got["steps"])
        assert [p for p in got["steps"] if p[1] == first] == [[device, step]], (f, got["steps"])
        assert check == "bwd_transit" or all(d == device for d, _ in got["steps"]), (f, got["steps"])
        owner = f.index[2] // (5 if check in ("bwd_dk", "bwd_dv", "bwd_transit") else 3)
        assert got["flagged"][check][owner] >= 1, (f, got["flagged"])
        assert set(got["flagged"]) == set(spec_ring_fused_backward.CHECKS)
    assert bw["compilations"] == 1


def test_ring_counters(result):
    t = result["tally"]
    assert t["ring faults"][:2] == [17, 17]  # 15 faults, and the 2 of the compilation check
    assert t["ring faults"][2] == ["softmax_dmr", [1, 2, 7]]
    assert t["ring clean"][:2] == [13, 0]
    assert t["ring jit"][:2] == [1, 1] and t["ring jit"][2] == ["softmax_dmr", [0, 3, 9]]


def test_ring_backward_is_checked(backward):
    """Clean gradients unflagged (``ring grads``' backward); each backward fault counted under its
    site, flagged at its device and step first (by that device alone) and by its check on the
    device that owns the row or key; ``"raise"`` poisons every gradient."""
    t, bw = backward["tally"], backward
    assert t["ring bwd clean (backward)"][:2] == [1, 0], t
    n = len(BACKWARD_CASES)
    assert t["ring bwd"][:2] == [n, 0] and t["ring bwd (backward)"][:2] == [n, n], t
    assert bw["counted"] == [[0, i + 1] for i in range(n)], bw["counted"]  # each fault counted by its call
    assert bw["compilations"] == 1
    for (f, device, step, check), got in zip(BACKWARD_CASES, bw["located"]):
        first = min(s for _, s in got["steps"])
        assert [p for p in got["steps"] if p[1] == first] == [[device, step]], (f, got["steps"])
        owner = f.index[2] // (5 if check in ("bwd_dk", "bwd_dv", "bwd_transit") else 3)
        assert got["flagged"][check][owner] >= 1, (f, got["flagged"])
    assert bw["raise_nan"] == [True, True, True]
    assert t["ring bwd raise (backward)"][:2] == [1, 1]


def test_ring_bad_input_names_the_argument(result):
    e = result["errors"]
    assert e["T"].startswith("ValueError: query:") and "T=10" in e["T"]
    assert e["axis"].startswith("ValueError: axis_name:")
    assert e["causal"].startswith("ValueError: is_causal:")
    assert e["step"].startswith("ValueError: fault.step:")
    assert e["implied"].startswith("ValueError: fault.step:") and "step 0" in e["implied"]
    assert e["on_fault"].startswith("ValueError: on_fault:")
    assert e["backward"].startswith("ValueError: fault.site: 'bwd_dq'") and "scheme 'baseline'" in e["backward"]


# ---- the spec's half, in this process


def test_ring_fault_validation():
    with pytest.raises(ValueError, match="fault.site"):
        RingFault("rescale", (0, 0, 0, 0), bit=1)
    with pytest.raises(ValueError, match="fault.index"):
        RingFault("lse", (0, 0, 0, 0), step=0, bit=1)
    with pytest.raises(ValueError, match="fault.step"):
        RingFault("out", (0, 0, 0, 0), bit=1)
    with pytest.raises(ValueError, match="exactly one of bit and value"):
        RingFault("probs", (0, 0, 0, 0))
    with pytest.raises(ValueError, match="fault.replica"):
        RingFault("scores", (0, 0, 0, 0), bit=1, replica=1)


def test_ring_plan_places_faults():
    dims = dict(B=2, T=12, S=20, N=6, K=3, H=8)
    p = ring.plan([RingFault("scores", (1, 5, 7, 12), bit=3), RingFault("value", (0, 2, 13, 4), step=3, bit=9),
                   RingFault("merge", (0, 1, 11, 7), step=1, value=2.0)], dims, 4, "bfloat16", ("qk_row",))
    assert p.device.tolist() == [2, 1, 3]  # row 7 of chunks of 3; key 13 (chunk 2) three steps on; row 11
    assert p.step.tolist() == [0, 3, 1]  # key 12 is in chunk 2, which device 2 reads at step 0
    assert p.index.tolist() == [[1, 5, 1, 2], [0, 2, 3, 4], [0, 1, 2, 7]]
    assert p.core_site.tolist()[1:] == [-1, -1] and p.kind.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="fault.bit"):
        ring.plan(RingFault("key", (0, 0, 0, 0), step=0, bit=16), dims, 4, "float16", ())
    with pytest.raises(ValueError, match="fault.index"):
        ring.plan(RingFault("probs", (0, 0, 12, 0), bit=1), dims, 4, "float32", ())
    with pytest.raises(TypeError, match="fault:"):
        ring.plan("probs", dims, 4, "float32", ())


def test_ring_thresholds_scale_with_magnitude():
    assert ring.lse_threshold(64, 1000.0) > 10 * ring.lse_threshold(64, 1.0)
    assert ring.weight_threshold(1e4) > ring.weight_threshold(1.0)
    assert ring.merge_threshold(8, 64, 10.0) == pytest.approx(10 * ring.merge_threshold(8, 64, 1.0), rel=1e-3)
    assert 0 < ring.transit_threshold(128, 1.0) < 1e-3
