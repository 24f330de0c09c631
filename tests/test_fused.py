"""``implementation="triton"``: the fused kernel against the float64 reference and
the unfused ``full`` scheme.

Without a GPU the kernels run in Triton's interpreter (``tests/conftest.py``
sets ``TRITON_INTERPRET=1`` before anything imports triton); with
``FTATTN_TEST_TORCH_DEVICE=cuda`` the same tests run compiled, plus the test
that reads the compiled kernel. bfloat16 runs on the CPU only because the
kernel upcasts its matrix products there (the interpreter's bfloat16
``tl.dot`` is wrong: triton-lang/triton issue 11584).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import ftattn_torch as ft  # noqa: E402
from ftattn_spec import reference as ref  # noqa: E402
from ftattn_spec import tolerances as tol  # noqa: E402
from ftattn_spec.faults import Fault, FaultDetected  # noqa: E402
from ftattn_spec.faults import plan as fault_plan  # noqa: E402
from ftattn_spec.inputs import DISTRIBUTIONS  # noqa: E402

from .fused_cases import CASES, FAULTS, SHAPE  # noqa: E402
from .inputs import exact, make_qkv  # noqa: E402

DEVICE = os.environ.get("FTATTN_TEST_TORCH_DEVICE", "cpu")
GPU = DEVICE == "cuda"
if not GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)



def _inputs(seed=0, dist="normal", dtype="float16", **shape):
    t = make_qkv(seed, dist, framework="torch", dtype=dtype, device=DEVICE, shape=SHAPE, **shape)
    return t, [exact(x) for x in t]  # the reference sees the rounded inputs


def _check_output(out, exact, dtype, is_causal, slack=1.0):
    o64, p, _ = ref.attention(*exact, is_causal=is_causal)
    bound = ref.output_bound(*exact, p, o64, dtype=dtype, is_causal=is_causal)
    err = np.abs(out.double().cpu().numpy() - o64)
    assert np.isfinite(err).all()
    worst = (err / bound).max()
    assert worst <= slack, f"output error {worst:.3g} x the bound"
    return o64




@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_output_within_bound_and_clean_run_not_flagged(case):
    case = dict(case)
    dtype, causal = case.pop("dtype"), case.pop("is_causal")
    (q, k, v), exact = _inputs(1, "normal", dtype, **case)
    out, report = ft.attention(q, k, v, is_causal=causal, implementation="triton")
    assert out.shape == q.shape and out.dtype == q.dtype
    _check_output(out, exact, dtype, causal)
    assert set(report.checks) == {"qk_row", "softmax_dmr", "pv_row"}
    assert not bool(report.detected) and bool(report.inputs_finite)
    assert report.located == {} and int(report.corrected) == 0
    for name, c in report.checks.items():
        assert c.residual.shape == (q.shape[0], q.shape[1], q.shape[2]), name
        assert bool((c.residual <= c.threshold).all()), name
        assert bool((c.threshold > 0).all()), name


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_clean_runs_never_flagged(dist):
    for seed in range(2):
        for causal in (False, True):
            (q, k, v), exact = _inputs(10 + seed, dist, "float16")
            out, report = ft.attention(q, k, v, is_causal=causal, implementation="triton")
            assert not bool(report.detected), (dist, seed, causal,
                                               {n: float((c.residual / c.threshold).max())
                                                for n, c in report.checks.items()})
            _check_output(out, exact, "float16", causal)


def test_matches_unfused_full():
    (q, k, v), exact = _inputs(3, "uniform", "float16")
    for causal in (False, True):
        a, ra = ft.attention(q, k, v, is_causal=causal, implementation="triton")
        b, rb = ft.attention(q, k, v, is_causal=causal)
        o64, p, _ = ref.attention(*exact, is_causal=causal)
        bound = ref.output_bound(*exact, p, o64, dtype="float16", is_causal=causal)
        assert (np.abs(a.double().cpu().numpy() - b.double().cpu().numpy()) <= 2 * bound).all()
        # the same checks measure the same quantity: residuals of both are far below thresholds.
        # Under a mask the kernel's qk_row magnitude counts every key of a tile it visits (an
        # upper bound: docs/tolerances.md), so a causal row's threshold may grow by up to the
        # keys per tile over the keys it attends
        tile = ft.fused.BlockSizes.get_default(ft.fused.interpreting()).block_n
        for name in ra.checks:
            limit = 8.0 * (tile if causal and name == "qk_row" else 1)
            assert float((ra.checks[name].threshold / rb.checks[name].threshold).max()) < limit, name
        assert not bool(ra.detected) and not bool(rb.detected)


def test_thresholds_grow_with_sequence_length():
    for fn in (lambda S: tol.fused_qk_coefficient(S, 128, "float16", 128, 128),
               lambda S: tol.fused_pv_coefficients(S, 128, "float16")[0],
               lambda S: tol.fused_dmr_coefficients(S, 128)[0]):
        values = [fn(S) for S in (128, 1024, 8192, 65536)]
        assert values == sorted(values) and values[-1] > 2 * values[0]


# ---- faults: the same plans as the unfused path, same verdicts

@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f"{f.site}{f.replica}-{f.bit}-{f.value}")
@pytest.mark.parametrize("causal", [False, True])
def test_verdicts_agree_with_unfused(fault, causal):
    (q, k, v), _ = _inputs(5, "normal", "float16")
    _, rf = ft.attention(q, k, v, is_causal=causal, implementation="triton", fault=fault)
    _, ru = ft.attention(q, k, v, is_causal=causal, fault=fault)
    b, n, i = fault.index[:3]
    masked = causal and fault.site in ("scores", "probs") and fault.index[3] > i
    assert bool(rf.detected) == bool(ru.detected) == (not masked)
    for name in rf.checks:  # the row that holds the fault, and only it, is flagged by the same check
        flags = rf.checks[name].flagged.cpu().numpy()
        assert (flags == ru.checks[name].flagged.cpu().numpy()).all(), name
    if not masked:
        hit = [name for name, c in rf.checks.items() if bool(c.flagged[b, n, i])]
        assert hit, "the faulty row is flagged"
        assert sum(int(c.flagged.sum()) for c in rf.checks.values()) == len(hit), "only the faulty row is"


def test_low_bits_are_below_the_thresholds_in_both():
    (q, k, v), _ = _inputs(6, "normal", "float16")
    for f in (Fault("scores", (0, 0, 3, 3), bit=0), Fault("out", (1, 2, 7, 1), bit=1)):
        _, rf = ft.attention(q, k, v, implementation="triton", fault=f)
        _, ru = ft.attention(q, k, v, fault=f)
        assert not bool(rf.detected) and not bool(ru.detected)


@pytest.mark.parametrize("fault", FAULTS[:1] + FAULTS[2:5], ids=lambda f: f.site)
def test_correct_recomputes_the_flagged_blocks(fault):
    (q, k, v), exact = _inputs(7, "normal", "float16")
    clean, _ = ft.attention(q, k, v, implementation="triton")
    out, report = ft.attention(q, k, v, implementation="triton", fault=fault, on_fault="correct")
    assert bool(report.detected) and int(report.corrected) >= 1
    assert torch.equal(out, clean)
    _check_output(out, exact, "float16", False)


def test_nan_and_raise_policies():
    (q, k, v), _ = _inputs(8, "normal", "float16")
    f = Fault("out", (1, 2, 9, 3), bit=30)
    out, report = ft.attention(q, k, v, implementation="triton", fault=f, on_fault="nan")
    bad = torch.isnan(out).any(-1)
    assert bool(bad[1, 2, 9]) and int(bad.sum()) == 1
    with pytest.raises(FaultDetected) as e:
        ft.attention(q, k, v, implementation="triton", fault=f, on_fault="raise")
    assert bool(e.value.report.detected)


def test_global_granularity():
    (q, k, v), _ = _inputs(9, "normal", "float16")
    _, clean = ft.attention(q, k, v, implementation="triton", granularity="global")
    assert not bool(clean.detected) and clean.checks["pv_row"].residual.shape == (SHAPE["B"], SHAPE["N"])
    _, rep = ft.attention(q, k, v, implementation="triton", granularity="global",
                          fault=Fault("scores", (1, 3, 30, 4), bit=30))
    assert bool(rep.checks["qk_row"].flagged[1, 3]) and int(rep.checks["qk_row"].flagged.sum()) == 1


def test_schemes_run_their_row_checks():
    (q, k, v), _ = _inputs(2, "normal", "float16")
    for scheme, expect in (("baseline", set()), ("dmr_softmax", {"softmax_dmr"}), ("abft_qk_row", {"qk_row"}),
                           ("abft_pv_row", {"pv_row"})):
        out, rep = ft.attention(q, k, v, scheme=scheme, implementation="triton")
        assert set(rep.checks) == expect and not bool(rep.detected) and bool(rep.inputs_finite)
    with pytest.raises(ValueError, match="abft_qk_col"):
        ft.attention(q, k, v, scheme="abft_qk_col", implementation="triton")


def test_nonfinite_input_fails_closed_and_is_named():
    (q, k, v), _ = _inputs(4, "normal", "float16")
    k = k.clone()
    k[1, 0, 3, 2] = float("nan")
    _, rep = ft.attention(q, k, v, implementation="triton")
    assert not bool(rep.inputs_finite) and bool(rep.detected)
    _, rep = ft.attention(q, k, v, scheme="baseline", implementation="triton")
    assert not bool(rep.inputs_finite)


def test_gradients_are_those_of_plain_attention():
    (q, k, v), _ = _inputs(11, "normal", "float16", T=20, S=24)
    grads = []
    for impl in ("triton", "unfused"):
        xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out, _ = ft.attention(*xs, is_causal=True, implementation=impl)
        (out.float() * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum().backward()
        grads.append([x.grad.float() for x in xs])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=2e-3, rtol=1e-2)


def test_unsupported_inputs_raise_naming_the_limit():
    (q, k, v), _ = _inputs(0, "normal", "float16")
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        ft.attention(q.float(), k.float(), v.float(), implementation="triton")
    with pytest.raises(ValueError, match="head dim"):
        ft.attention(q[..., :12], k[..., :12], v[..., :12], implementation="triton")
    with pytest.raises(TypeError, match="mask"):
        ft.attention(q, k, v, mask=torch.ones(37, 45, device=q.device), implementation="triton")
    with pytest.raises(ValueError, match="local_window_size"):
        ft.attention(q, k, v, local_window_size=-4, implementation="triton")
    with pytest.raises(ValueError, match="implementation"):
        ft.attention(q, k, v, implementation="cuda")


@pytest.mark.skipif(GPU, reason="needs a machine without a GPU")
def test_cpu_without_interpreter_says_how_to_enable_it():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch, ftattn_torch as ft\n"
            "q = torch.zeros(1, 1, 4, 16, dtype=torch.float16)\n"
            "try:\n    ft.attention(q, q, q, implementation='triton')\n"
            "except ValueError as e:\n    print(e)\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "TRITON_INTERPRET=1" in res.stdout, res.stdout + res.stderr


@pytest.mark.skipif(not GPU, reason="the compiler's contraction it guards against happens on a GPU only")
@pytest.mark.parametrize("block_n", [16, 32, 64])
def test_large_logits_many_tiles_not_flagged(block_n):
    """Clean rows of logits with a standard deviation of 64 over 2048 keys: softmax_dmr stays
    clean at every key tile. Before the replica's rescale factor was held at 1 where the
    maximum does not rise, a contracted m·c − m_sc left u·μ at every tile on the H200 (ratio
    1.5 at 64 keys per tile, 6.0 at 16; docs/kernels.md, "softmax_dmr at large logits")."""
    from ftattn_torch.fused import launch
    from ftattn_torch.fused.blocks import BlockSizes

    g = torch.Generator(device=DEVICE).manual_seed(block_n)
    q, k, v = ((8.0 * torch.randn(1, 4, 2048, 32, device=DEVICE, generator=g)).to(torch.bfloat16) for _ in range(3))
    got = launch.forward(q, k, v, scale=32 ** -0.5, is_causal=False, checks_on=True,
                         blocks=BlockSizes(128, block_n, 8, 3))
    assert float((got.stats[2] / got.stats[3]).max()) < 1.0


@pytest.mark.skipif(not GPU, reason="reads the compiled kernel's PTX: needs a GPU")
def test_softmax_replica_survives_compilation():
    """The checked kernel evaluates every exponential twice: its PTX holds at
    least twice the ``ex2`` instructions of the kernel with the checks compiled
    out (a replica merged by CSE, or dropped as dead code, fails this)."""
    import re

    from ftattn_torch import fused

    (q, k, v), _ = _inputs(0, "normal", "float16", T=256, S=256, H=64)
    count = {}
    for on in (True, False):
        bs = fused.BlockSizes(128, 64, 4, 2, "mufu")
        compiled = fused.forward(q, k, v, scale=0.125, is_causal=False, checks_on=on, blocks=bs)[-1]
        count[on] = len(re.findall(r"\bex2\.approx", compiled.asm["ptx"]))
    assert count[False] > 0 and count[True] >= 2 * count[False] - 4, count


def test_heads_beyond_one_grid_axis_launch_in_slices(monkeypatch):
    """B·N above CUDA's 65535 limit on a grid's second axis runs in slices (shrunk here to 3)."""
    from ftattn_torch.fused import launch

    (q, k, v), _ = _inputs(12, "normal", "float16", T=20, S=24)
    whole, rw = ft.attention(q, k, v, implementation="triton", fault=Fault("out", (1, 3, 5, 2), bit=30))
    monkeypatch.setattr(launch, "_MAX_GRID_Y", 3)
    sliced, rs = ft.attention(q, k, v, implementation="triton", fault=Fault("out", (1, 3, 5, 2), bit=30))
    assert torch.equal(whole, sliced)
    for name in rw.checks:
        assert torch.equal(rw.checks[name].flagged, rs.checks[name].flagged)
    assert bool(rs.checks["pv_row"].flagged[1, 3, 5]) and int(rs.checks["pv_row"].flagged.sum()) == 1


def test_sdpa_dropin_and_module_take_the_kernel():
    from ftattn_torch import FaultTolerantAttention, scaled_dot_product_attention

    (q, k, v), exact = _inputs(13, "normal", "float16", T=20, S=24)
    ref_out, ref_rep = ft.attention(q, k, v, is_causal=True, implementation="triton")
    out, rep = scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, implementation="triton",
                                            return_report=True)
    assert torch.equal(out, ref_out) and set(rep.checks) == set(ref_rep.checks) and rep.located == {}
    f = Fault("scores", (1, 3, 7, 2), bit=30)
    out, rep = scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, implementation="triton",
                                            fault=f, on_fault="correct", return_report=True)
    assert bool(rep.detected) and torch.equal(out, ref_out)
    # a boolean attn_mask runs in the kernel too (the masks' own suite: test_fused_masks.py)
    causal = torch.ones(20, 24, dtype=torch.bool, device=q.device).tril()
    out, rep = scaled_dot_product_attention(q, k, v, causal, enable_gqa=True, implementation="triton",
                                            return_report=True)
    # the masked tiles take another path through the kernel: on a GPU the float32 sums may round
    # differently, so the outputs agree to the output's rounding (a few float16 ulps), not bitwise
    ulp = float(ref_out.abs().max()) * 2.0 ** -10
    assert rep.ran.implementation == "triton" and float((out - ref_out).abs().max()) <= 4 * ulp
    m = FaultTolerantAttention(is_causal=True, enable_gqa=True, implementation="triton")
    m(q, k, v)
    m(q, k, v, fault=f)
    assert int(m.calls) == 2 and int(m.faults_detected) == 1 and "triton" in repr(m)


@pytest.mark.slow
def test_opcheck_of_the_dropin_with_the_kernel():
    (q, k, v), _ = _inputs(14, "normal", "float16", T=18, S=21)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.ftattn.sdpa.default,
                          (q, k, v, None, True, 0.3, "full", "vector", "report", None, None, "triton"))


def test_non_contiguous_inputs():
    """Inputs laid out B T N H (a transposed view, as a model holds them) give the same result."""
    (q, k, v), exact = _inputs(15, "normal", "float16")
    views = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
    assert not views[0].is_contiguous()
    a, ra = ft.attention(q, k, v, is_causal=True, implementation="triton")
    b, rb = ft.attention(*views, is_causal=True, implementation="triton")
    assert torch.equal(a, b) and not bool(rb.detected)
    _check_output(b, exact, "float16", True)


@pytest.mark.parametrize("case", CASES[:2] + CASES[4:6], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_tensor_descriptor_reads_equal_pointer_reads(case):
    """``BlockSizes(tma=True)`` reads K, V and the pv_row columns through tensor descriptors
    (zero-filled past S); every output, statistic and count equals the pointer reads', with a
    fault planted and the softmax_exp check on."""
    from ftattn_torch.fused import launch

    case = dict(case)
    dtype, causal = case.pop("dtype"), case.pop("is_causal")
    (q, k, v), exact = _inputs(21, "normal", dtype, **case)
    plan = fault_plan([Fault("probs", (0, 1, min(3, q.shape[2] - 1), 2), bit=29)])
    got = {}
    for tma in (False, True):
        bs = launch.BlockSizes(16, 16, 1, 1, tma=tma)
        got[tma] = launch.forward(q, k, v, scale=q.shape[-1] ** -0.5, is_causal=causal, checks_on=True,
                                  plan=plan, blocks=bs)
    for a, b in zip(got[False][:4], got[True][:4]):
        assert torch.equal(a, b)
    assert bool(got[True].flags.any())
    clean = launch.forward(q, k, v, scale=q.shape[-1] ** -0.5, is_causal=causal, checks_on=True,
                           blocks=launch.BlockSizes(16, 16, 1, 1, tma=True))
    _check_output(clean.out, exact, dtype, causal)
    assert not bool(clean.flags.any())


def test_tensor_descriptors_refuse_unaligned_operands():
    from ftattn_torch.fused import launch

    (q, k, v), _ = _inputs(22, "normal", "float16")
    wide = torch.zeros(*k.shape[:-1], k.shape[-1] + 4, dtype=k.dtype, device=k.device)
    wide[..., :k.shape[-1]] = k
    k = wide[..., :k.shape[-1]]  # rows 8 bytes longer than a multiple of 16
    with pytest.raises(ValueError, match="blocks.tma"):
        launch.forward(q, k, v, scale=0.3, is_causal=False, checks_on=True,
                       blocks=launch.BlockSizes(16, 16, 1, 1, tma=True))
