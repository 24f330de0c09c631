"""The thresholds are not vacuous: an error just above a row's threshold is flagged,
in that row only, and one well below it is not.

Errors are added through the backends' private perturbation hook, between a
computation and its check, at logical (batch, head, row, column) indices.
"""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import SHAPE, draw_qkv

# site perturbed → check that must see it, orientation of the flagged index
CASES = [
    ("scores", "qk_row", "row"),
    ("scores", "qk_col", "col"),
    ("probs", "softmax_dmr", "row"),
    ("probs_replica", "softmax_dmr", "row"),
    ("out", "pv_row", "row"),
]


@pytest.mark.parametrize("site,check,orient", CASES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_error_above_threshold_is_flagged_and_located(backend, site, check, orient, dtype, is_causal):
    rng = np.random.default_rng(abs(hash((site, check, dtype, is_causal))) % 2**31)
    q, k, v = (backend.array(x, dtype) for x in draw_qkv(int(rng.integers(1 << 30)), "normal", **SHAPE))
    _, clean = backend.perturbed(q, k, v, None, is_causal=is_causal)
    clean = backend.numpy_report(clean)
    B, N, T, S, H = (SHAPE[a] for a in "BNTSH")
    b, n, i = int(rng.integers(B)), int(rng.integers(N)), int(rng.integers(T))
    j = int(rng.integers(H)) if site == "out" else int(rng.integers(min(i + 1, S) if is_causal else S))
    where = (b, n, i) if orient == "row" else (b, n, j)
    thr = float(clean.checks[check].threshold[where])
    res = float(clean.checks[check].residual[where])
    assert res < 0.1 * thr

    for factor, sign in ((1.5, 1.0), (3.0, -1.0)):
        _, rep = backend.perturbed(q, k, v, (site, (b, n, i, j), sign * factor * thr), is_causal=is_causal)
        rep = backend.numpy_report(rep)
        flagged = rep.checks[check].flagged
        assert bool(rep.detected)
        assert flagged[where], f"{check}: error {factor}x threshold not flagged"
        assert flagged.sum() == 1, f"{check}: flagged {np.argwhere(flagged).tolist()}, expected {where}"

    _, rep = backend.perturbed(q, k, v, (site, (b, n, i, j), 0.5 * thr), is_causal=is_causal)
    assert not backend.numpy_report(rep).checks[check].flagged.any()


@pytest.mark.parametrize("site,check,orient", CASES)
def test_global_granularity_flags_the_batch_head(backend, site, check, orient):
    q, k, v = (backend.array(x, "float16") for x in draw_qkv(5, "uniform", **SHAPE))
    _, clean = backend.perturbed(q, k, v, None, granularity="global")
    thr = backend.numpy_report(clean).checks[check].threshold
    _, rep = backend.perturbed(q, k, v, (site, (2, 4, 30, 9), 2.0 * float(thr[2, 4])), granularity="global")
    rep = backend.numpy_report(rep)
    flagged = rep.checks[check].flagged
    assert flagged.shape == (SHAPE["B"], SHAPE["N"])
    assert flagged[2, 4] and flagged.sum() == 1


def test_masked_entries_are_not_checked(backend):
    """An error in a causally masked score changes nothing and flags nothing."""
    q, k, v = (backend.array(x, "float32") for x in draw_qkv(9, "normal", **SHAPE))
    out0, _ = backend.perturbed(q, k, v, None, is_causal=True)
    out1, rep = backend.perturbed(q, k, v, ("scores", (0, 0, 3, 20), 1e6), is_causal=True)
    assert not bool(backend.numpy_report(rep).detected)
    np.testing.assert_array_equal(backend.logical(out0), backend.logical(out1))


@pytest.mark.parametrize("scheme,silent", [("baseline", ["scores", "probs", "out"]),
                                           ("abft_qk_row", ["probs", "out"]),
                                           ("dmr_softmax", ["scores", "out"]),
                                           ("abft_pv_row", ["scores"])])
def test_schemes_only_see_their_sites(backend, scheme, silent):
    """A scheme without the check for a site reports nothing there (and its output changes)."""
    q, k, v = (backend.array(x, "float32") for x in draw_qkv(10, "normal", **SHAPE))
    for site in silent:
        _, rep = backend.perturbed(q, k, v, (site, (1, 1, 1, 1), 100.0), scheme=scheme)
        assert not bool(backend.numpy_report(rep).detected), site
