"""The fault models beyond single bit flips (``ftattn_spec.fault_models``): several bits of one
element, a bit stuck over a row, a head or the whole call, and a fault that repeats, in every
implementation that injects them (unfused JAX and PyTorch, the interpreted Triton and portable
Pallas kernels), with the monitor's replay calling a repeating fault persistent."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import ftattn_jax
import ftattn_torch
from ftattn_spec import Fault, fault_models as fm
from ftattn_spec.faults import plan

B, T, N, K, S, H = 2, 20, 4, 1, 36, 16  # every axis a different size but B (the kernels' tiles need H = 16)
_RNG = np.random.default_rng(11)
Q, KK, V = (_RNG.standard_normal(s).astype(np.float32) for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))


def _run(impl: str, faults):
    """``(output (B, T, N, H) as float64, report as NumPy)`` of one implementation."""
    if impl in ("jax", "pallas"):
        dt = np.float32 if impl == "jax" else np.float16
        o, r = ftattn_jax.attention(*(x.astype(dt) for x in (Q, KK, V)), fault=faults,
                                    implementation="unfused" if impl == "jax" else "pallas")
        return np.asarray(o, np.float64), jax.tree_util.tree_map(np.asarray, r)
    dt = torch.float32 if impl == "torch" else torch.float16
    q, k, v = (torch.from_numpy(x).transpose(1, 2).contiguous().to(dt) for x in (Q, KK, V))
    o, r = ftattn_torch.attention(q, k, v, fault=faults, implementation="unfused" if impl == "torch" else "triton")
    return o.transpose(1, 2).double().numpy(), r


def _rows(report, check):
    return {tuple(i) for i in np.argwhere(np.asarray(report.checks[check].flagged))}


IMPLS = ["jax", "torch", "pallas", "triton"]
#: the interpreted kernels are slow on a CPU: the first test runs them in CI, the others under -m slow
SLOW_KERNELS = ["jax", "torch", pytest.param("pallas", marks=pytest.mark.slow),
                pytest.param("triton", marks=pytest.mark.slow)]


@pytest.mark.parametrize("impl", IMPLS)
def test_stuck_row_of_p_is_detected_on_that_row_only(impl):
    out, rep = _run(impl, fm.stuck_row("probs", 1, 2, 5, bit=30, to=1))
    clean, _ = _run(impl, None)
    assert bool(rep.detected) and _rows(rep, "softmax_dmr") == {(1, 2, 5)}
    changed = np.argwhere(~np.all(out == clean, axis=-1))  # (b, t, n) rows of the output (NaN counts)
    assert {tuple(x) for x in changed} == {(1, 5, 2)}


@pytest.mark.parametrize("impl", SLOW_KERNELS)
def test_stuck_at_zero_in_a_head_and_in_the_whole_call(impl):
    _, head = _run(impl, fm.stuck_head("probs", 0, 3, bit=29, to=0))  # probabilities near 2^-64
    assert bool(head.detected) and {r[:2] for r in _rows(head, "softmax_dmr")} == {(0, 3)}
    _, call = _run(impl, fm.stuck_call("scores", bit=30, to=1))  # every score huge
    assert bool(call.detected) and len(_rows(call, "qk_row")) >= B * N * T // 2


@pytest.mark.parametrize("impl", SLOW_KERNELS)
def test_a_bit_already_set_everywhere_changes_nothing(impl):
    """Bit 29 (exponent 2^6) is 1 in every float32 of magnitude in [2^-63, 2): holding it at 1 is
    harmless, and nothing is flagged (the test of the model itself: it can leave data alone)."""
    out, rep = _run(impl, fm.stuck_row("probs", 0, 1, 3, bit=29, to=1))
    clean, _ = _run(impl, None)
    assert not bool(rep.detected) and np.array_equal(out, clean)


@pytest.mark.parametrize("impl", ["jax", "torch", pytest.param("pallas", marks=pytest.mark.slow), "triton"])
def test_multi_bit_is_the_xor_of_its_bits(impl):
    """(Triton in CI: its loop over several faults is the one that miscompiled on a GPU.)"""
    faults = fm.multi_bit("probs", (1, 0, 7, 9), (30, 12, 3))
    out, rep = _run(impl, faults)
    assert bool(rep.detected) and (1, 0, 7) in _rows(rep, "softmax_dmr")
    two = fm.multi_bit("probs", (1, 0, 7, 9), (12, 3))  # without bit 30: a different output
    assert not np.array_equal(out, _run(impl, two)[0])


def test_unfused_backends_agree_on_stuck_faults():
    for faults in (fm.stuck_row("scores", 0, 1, 4, bit=27, to=1), fm.stuck_head("out", 1, 2, bit=30, to=1),
                   fm.stuck_call("probs", bit=25, to=0)):
        _, rj = _run("jax", faults)
        _, rt = _run("torch", faults)
        assert set(rj.checks) == set(rt.checks)
        for c in rj.checks:
            assert _rows(rj, c) == _rows(rt, c), (faults, c)


def test_one_compilation_serves_every_stuck_fault_of_a_shape():
    f = jax.jit(lambda q, k, v, fl: ftattn_jax.attention(q, k, v, fault=fl)[1].detected)
    got = [bool(f(Q, KK, V, fm.stuck_row("probs", b, n, t, bit=30, to=1)))
           for b, n, t in ((0, 0, 0), (1, 3, 19), (1, 1, 4))]
    assert got == [True, True, True] and f._cache_size() == 1


def test_a_repeating_fault_is_called_persistent_and_a_one_off_transient():
    ftattn_torch.counters.reset()  # the calls of earlier tests in this process
    mon = ftattn_torch.monitor.Monitor()
    stuck = fm.stuck_row("probs", 0, 0, 2, bit=30, to=1)
    for _ in range(3):  # a defective unit: every call
        _run("torch", stuck)
    verdict = mon.step()
    assert [(v.calls, v.detected) for v in verdict.sites.values()] == [(3, 3)]
    assert mon.replay(lambda device: _run("torch", stuck)).kind == "persistent"
    assert mon.replay(lambda device: _run("torch", None)).kind == "transient"


def test_models_refuse_what_they_cannot_express():
    with pytest.raises(ValueError, match="bits: expected 2 to 4 distinct"):
        fm.multi_bit("probs", (0, 0, 0, 0), (3, 3))
    with pytest.raises(ValueError, match="site: expected one of"):
        fm.stuck_row("query", 0, 0, 0, bit=3)
    with pytest.raises(ValueError, match="fault.index: expected 4 ints"):
        Fault("probs", (0, None, 0, 0), bit=3)  # a wildcard needs stuck=
    with pytest.raises(ValueError, match="fault.stuck: expected None, 0 or 1"):
        Fault("probs", (0, 0, 0, 0), bit=3, stuck=2)
    with pytest.raises(ValueError, match="fault.bit: expected the bit a stuck-at fault holds"):
        Fault("probs", (0, 0, 0, 0), value=1.0, stuck=1)
    with pytest.raises(ValueError, match="model: expected one of"):
        fm.draw("cosmic", np.random.default_rng(0), "probs", (0, 0, 0, 0), 3, "float32")
    p = plan(fm.stuck_head("out", 1, 2, bit=4, to=0))
    assert p.index.tolist() == [[1, 2, -1, -1]] and p.kind.tolist() == [4]


def test_hopper_kernel_refuses_stuck_faults():
    from ftattn_jax.fused import mosaic_kernel
    why = mosaic_kernel.unsupported(jax.numpy.zeros((1, 128, 1, 64), "float16"), platform="gpu", interpret=False,
                                    plan=plan(fm.stuck_row("probs", 0, 0, 1, bit=30)))
    assert why is not None
