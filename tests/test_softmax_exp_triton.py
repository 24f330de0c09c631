"""``softmax_exp`` in the Triton kernel (``implementation="triton"``): clean runs pass with margin
at every input distribution, mask form and magnitude; a probability corrupted after the
exponential is flagged at its row, however it is corrupted, down to the floor the tolerance
model predicts; the other policies and the global granularity see it.

Interpreted without a GPU (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``), compiled with
``FTATTN_TEST_TORCH_DEVICE=cuda``.
"""

from __future__ import annotations

import numpy as np
import pytest

from .fused_cases import SHAPE, triton_device

DEVICE = triton_device()

import torch  # noqa: E402

import ftattn_torch as ft  # noqa: E402
from ftattn_spec import reference as ref  # noqa: E402
from ftattn_spec.faults import Fault  # noqa: E402
from ftattn_spec.inputs import DISTRIBUTIONS  # noqa: E402

from .inputs import exact, make_qkv  # noqa: E402

SCHEMES = ("abft_softmax", "abft_all")
#: the interpreter is slow: by default two cases of each kind, the rest under ``-m slow``
_BITS = [b if b in (30, 22) else pytest.param(b, marks=pytest.mark.slow) for b in (30, 27, 24, 23, 22, 20)]


def _inputs(seed, dist="normal", dtype="float16", **shape):
    t = make_qkv(seed, dist, framework="torch", dtype=dtype, device=DEVICE, shape=SHAPE, **shape)
    return t, [exact(x) for x in t]


def _worst(report):
    return {n: float((c.residual / c.threshold).max()) for n, c in report.checks.items()}


def test_shape_axes_differ():
    assert len({SHAPE[a] for a in "BNTSH"}) == 5


@pytest.mark.parametrize("dist, scheme", [("normal", "abft_softmax"), ("large", "abft_all")]
                         + [pytest.param(d, s, marks=pytest.mark.slow) for d in DISTRIBUTIONS for s in SCHEMES
                            if (d, s) not in (("normal", "abft_softmax"), ("large", "abft_all"))])
def test_clean_runs_pass_with_margin(dist, scheme):
    for causal, dtype in ((False, "float16"), (True, "bfloat16")):
        (q, k, v), x = _inputs(3, dist, dtype)
        out, report = ft.attention(q, k, v, is_causal=causal, implementation="triton", scheme=scheme)
        assert "softmax_exp" in report.checks
        worst = _worst(report)
        assert not bool(report.detected), (dist, causal, worst)
        assert worst["softmax_exp"] < 0.5, worst  # the bound is not tight by luck
        o64, p, _ = ref.attention(*x, is_causal=causal)
        bound = ref.output_bound(*x, p, o64, dtype=dtype, is_causal=causal)
        assert (np.abs(out.double().cpu().numpy() - o64) / bound).max() <= 1.0


@pytest.mark.parametrize("magnitude", [1e-3, 30.0, 1e3])
def test_any_finite_magnitude_passes(magnitude):
    (q, k, v), _ = _inputs(4, "normal")
    q = (q.float() * magnitude).half()
    _, report = ft.attention(q, k, v, implementation="triton", scheme="abft_softmax")
    assert not bool(report.detected), _worst(report)


def _masks(rng):
    B, N, T, S = (SHAPE[a] for a in "BNTS")
    yield "mask", dict(mask=torch.from_numpy(rng.random((B, 1, T, S)) < 0.7).to(DEVICE))
    yield "bias", dict(bias=torch.from_numpy(rng.standard_normal((1, N, T, S)) * 3).float().to(DEVICE))
    yield "lengths", dict(query_seq_lengths=torch.tensor([T, 20, 0][:B], device=DEVICE),
                          key_value_seq_lengths=torch.tensor([S, 7, 30][:B], device=DEVICE))
    yield "window", dict(local_window_size=(5, 3))


@pytest.mark.parametrize("form", ["mask", "bias", "lengths", "window"])
def test_every_mask_form_passes_clean(form):
    kw = dict(_masks(np.random.default_rng(1)))[form]
    (q, k, v), _ = _inputs(5, "normal")
    _, report = ft.attention(q, k, v, implementation="triton", scheme="abft_softmax", **kw)
    assert not bool(report.detected), (form, _worst(report))


def _largest_prob(q, k, b, n, i, causal=False):
    """The column of the largest probability of row (b, n, i)."""
    G = q.shape[1] // k.shape[1]
    s = (q[b, n, i].double() @ k[b, n // G].double().T).cpu().numpy()
    if causal:
        s[i + 1:] = -np.inf
    return int(np.argmax(s))


@pytest.mark.parametrize("bit", _BITS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_corrupted_probability_is_flagged_at_its_row(bit, scheme):
    (q, k, v), _ = _inputs(6, "normal")
    b, n, i = 1, 2, 17
    j = _largest_prob(q, k, b, n, i)
    f = Fault("probs", (b, n, i, j), bit=bit)
    _, report = ft.attention(q, k, v, implementation="triton", scheme=scheme, fault=f)
    c = report.checks["softmax_exp"]
    assert bool(c.flagged[b, n, i]), (bit, float(c.residual[b, n, i]))
    assert int(c.flagged.sum()) == 1


@pytest.mark.slow
def test_detection_floor_of_one_probability():
    """A relative error δ in one probability moves L by log₂(1 + δ): the row's ratio grows linearly
    in δ, so the floor (the δ at ratio 1) is 1e-2 over the ratio at 1e-2; it lies below 3e-3 (the
    tile bound grows with the tile: 1.45e-3 compiled with 64-key tiles on the H200, 2026-12-03,
    lower in the interpreter's 16-key tiles), and far above the clean residual."""
    (q, k, v), _ = _inputs(7, "normal")
    b, n, i = 0, 1, 9
    j = _largest_prob(q, k, b, n, i)
    _, clean = ft.attention(q, k, v, implementation="triton", scheme="abft_softmax")
    # the row's largest probability is exactly 1 in the kernel (its argument is 0): set it to 1 + δ
    res = {}
    for delta in (1e-2, 1e-3, 1e-6):
        f = Fault("probs", (b, n, i, j), value=1.0 + delta)
        _, rep = ft.attention(q, k, v, implementation="triton", scheme="abft_softmax", fault=f)
        res[delta] = (bool(rep.checks["softmax_exp"].flagged[b, n, i]), float(rep.checks["softmax_exp"].residual[b, n, i]))
    assert res[1e-2][0] and not res[1e-6][0], res
    assert 5.0 < res[1e-2][1] / res[1e-3][1] < 20.0, res  # linear in δ, the clean part aside
    assert 1e-2 / res[1e-2][1] < 3e-3, res
    assert res[1e-3][0] == (res[1e-3][1] > 1.0)
    assert float(clean.checks["softmax_exp"].residual[b, n, i]) < res[1e-3][1]


def test_policies_and_global_granularity():
    (q, k, v), x = _inputs(8, "normal")
    b, n, i = 2, 1, 30
    f = Fault("probs", (b, n, i, _largest_prob(q, k, b, n, i)), bit=29)
    clean, _ = ft.attention(q, k, v, implementation="triton", scheme="abft_softmax")
    out, rep = ft.attention(q, k, v, implementation="triton", scheme="abft_softmax", fault=f, on_fault="correct")
    assert bool(rep.detected) and int(rep.corrected) >= 1 and torch.equal(out, clean)
    out, rep = ft.attention(q, k, v, implementation="triton", scheme="abft_softmax", fault=f, on_fault="nan")
    bad = torch.isnan(out).any(-1)
    assert bool(bad[b, n, i]) and int(bad.sum()) == 1
    _, g = ft.attention(q, k, v, implementation="triton", scheme="abft_softmax", granularity="global", fault=f)
    c = g.checks["softmax_exp"]
    assert c.residual.shape == (SHAPE["B"], SHAPE["N"])
    assert bool(c.flagged[b, n]) and int(c.flagged.sum()) == 1
    _, g = ft.attention(q, k, v, implementation="triton", scheme="abft_softmax", granularity="global")
    assert not bool(g.detected)


def test_a_nan_probability_fails_closed():
    (q, k, v), _ = _inputs(9, "normal")
    f = Fault("probs", (0, 0, 3, 2), value=float("nan"))
    _, rep = ft.attention(q, k, v, implementation="triton", scheme="abft_softmax", fault=f)
    assert bool(rep.checks["softmax_exp"].flagged[0, 0, 3])


def test_a_fault_at_a_masked_entry_is_flagged():
    """Above the causal diagonal p is 0; a fault there changes the output and fails the row."""
    (q, k, v), _ = _inputs(10, "normal")
    f = Fault("probs", (1, 1, 4, 20), value=0.5)
    _, rep = ft.attention(q, k, v, implementation="triton", scheme="abft_softmax", is_causal=True, fault=f)
    c = rep.checks["softmax_exp"]
    assert bool(c.flagged[1, 1, 4]) and int(c.flagged.sum()) == 1


#: the interpreter is slow: the row sum by default (the portable Pallas tests run the rescale factor)
_ROW_SITES = [("rowsum", 27), pytest.param("rescale", 25, marks=pytest.mark.slow),
              pytest.param("rescale", 22, marks=pytest.mark.slow), pytest.param("rowsum", 20, marks=pytest.mark.slow)]


@pytest.mark.parametrize("site, bit", _ROW_SITES)
def test_a_corrupted_rescale_factor_or_row_sum_is_flagged(site, bit):
    """Two per-row values of a tile exist only in the fused kernels. The online softmax's rescale
    factor 2^(m_old − m_new) (site ``rescale``) rescales everything the row summed before:
    ``softmax_exp`` evaluates it twice, as the DMR's replica does. The tile's row sum of the
    probabilities (site ``rowsum``) enters l, which the output divides by: ``softmax_exp`` compares
    l with the tensor cores' P̂·1 (VCOL's column of ones), the DMR the tile sum with its replica's
    (the tiles' L and R alone never read l). A fault at either is flagged at its row, and only there;
    the unfused path refuses both sites."""
    from ftattn_spec.faults import SITES

    from ftattn_torch.fused import triton_kernel

    assert (triton_kernel.SITE_RESCALE, triton_kernel.SITE_ROWSUM) == (SITES.index("rescale"), SITES.index("rowsum"))
    (q, k, v), _ = _inputs(11, "normal", S=70)
    b, n, i = 2, 3, 21
    clean, _ = ft.attention(q, k, v, implementation="triton", scheme="abft_softmax")
    # the last key: in a tile after the first at every tile width (a fault in the first tile's
    # rescale factor scales nothing, on the GPU's 64-key tiles as in the interpreter's 16-key ones)
    f = Fault(site, (b, n, i, 69), bit=bit)
    for scheme, check in (("abft_softmax", "softmax_exp"), ("full", "softmax_dmr")):
        out, rep = ft.attention(q, k, v, implementation="triton", scheme=scheme, fault=f)
        assert not torch.equal(out[b, n, i], clean[b, n, i]) and torch.equal(out[b, n, i + 1], clean[b, n, i + 1])
        c = rep.checks[check]
        assert bool(c.flagged[b, n, i]) and int(c.flagged.sum()) == 1, (scheme, float(c.residual[b, n, i]))
    with pytest.raises(ValueError, match=f"{site}.*fused forward"):
        ft.attention(q, k, v, implementation="unfused", fault=f)


@pytest.mark.parametrize("causal", [False, True])
def test_both_forms_of_the_log_sum_agree(causal):
    """``BlockSizes(exp_logs=...)``: exponent fields with a product of mantissas (the default) and
    pairs of probabilities per logarithm give the same verdicts, clean and with a fault at P, and
    residuals within a small part of the threshold of each other."""
    import dataclasses

    from ftattn_spec.faults import plan

    from ftattn_torch import fused

    (q, k, v), _ = _inputs(9, "normal")
    b, n, i = 1, 2, 17
    j = _largest_prob(q, k, b, n, i, causal)
    plane = fused.STAT_PLANES["softmax_exp"]
    got = {}
    for form in ("pairs", "fields"):
        bs = dataclasses.replace(fused.BlockSizes.get_default(interpret=DEVICE == "cpu"), exp_logs=form)
        for name, fp in (("clean", None), ("fault", plan([Fault("probs", (b, n, i, j), bit=22)]))):
            _, stats, flags, *_ = fused.forward(q, k, v, scale=SHAPE["H"] ** -0.5, is_causal=causal,
                                                checks_on=True, which=("softmax_exp",), plan=fp, blocks=bs)
            got[form, name] = (stats[2 * plane].cpu().numpy(), flags[plane].cpu().numpy())
    assert fused.BlockSizes(16, 16).exp_logs == "fields"
    for name in ("clean", "fault"):
        (ra, fa), (rb, fb) = got["pairs", name], got["fields", name]
        np.testing.assert_array_equal(fa, fb)
        assert np.abs(ra - rb).max() < 0.05, np.abs(ra - rb).max()
    assert not got["pairs", "clean"][1].any() and got["pairs", "fault"][1].sum() == 1
    assert got["pairs", "fault"][1][b, n, i]
    with pytest.raises(ValueError, match="exp_logs"):
        fused.BlockSizes(16, 16, exp_logs="each")
