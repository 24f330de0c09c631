"""The framework-free spec: catalogue, presets, legend, validation, tolerance model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ftattn_spec import CHECKS, GRANULARITIES, PRESETS, SCHEMES, LAYOUTS, preset, transpose_perm
from ftattn_spec import reference as ref
from ftattn_spec import tolerances as tol
from ftattn_spec import validation as v


def test_scheme_catalogue_matches_the_issue():
    assert {n: s.checks for n, s in SCHEMES.items()} == {
        "baseline": (),
        "dmr_softmax": ("softmax_dmr",),
        "abft_qk_col": ("qk_col",),
        "abft_qk_row": ("qk_row",),
        "abft_pv_row": ("pv_row",),
        "abft_softmax": ("softmax_exp",),
        "abft_all": ("qk_row", "qk_col", "softmax_exp", "pv_row", "pv_col"),
        "full": ("qk_row", "qk_col", "softmax_dmr", "pv_row", "pv_col"),
    }
    assert CHECKS == ("qk_row", "qk_col", "softmax_dmr", "softmax_exp", "pv_row", "pv_col")
    assert GRANULARITIES == ("vector", "global")
    # the notebook's schemes name their cells; the exponential checksum is ftattn's own (issue 21)
    assert all(s.notebook_cells for n, s in SCHEMES.items() if n not in ("abft_softmax", "abft_all"))


def test_presets():
    assert [s.T for s in PRESETS["seed"]] == [512, 1024, 2048, 4096, 8192]
    assert all((s.B, s.N, s.H) == (2, 32, 128) and s.T == s.S for s in PRESETS["seed"])
    assert all(s.B * s.T == 16384 and (s.N, s.H) == (32, 128) for s in PRESETS["seed-tokens"])
    assert all(s.B * s.T == 16384 and (s.N, s.H) == (16, 64) for s in PRESETS["seed-small-heads"])
    assert [(s.B, s.N, s.T, s.S, s.H) for s in PRESETS["warmup"]] == [(2, 32, 128, 128, 128)]
    assert all(s.B * s.N * s.T * s.S * s.H <= 2**24 for s in PRESETS["cpu"])
    assert PRESETS["seed"][0].flops() == 4 * 2 * 32 * 512 * 512 * 128
    assert PRESETS["seed"][0].flops(is_causal=True) == PRESETS["seed"][0].flops() / 2
    with pytest.raises(ValueError, match="preset"):
        preset("huge")


def test_layouts_and_transpose():
    assert LAYOUTS == {"jax": ("BTNH", "BSKH"), "torch": ("BNTH", "BKSH")}
    x = np.zeros((2, 3, 5, 7))
    assert x.transpose(transpose_perm("BTNH", "BNTH")).shape == (2, 5, 3, 7)


def test_gamma_is_a_bound_for_both_mechanisms():
    u = tol.U_ACC
    for n in (1, 16, 100, 4096, 8192):
        assert tol.gamma(n) >= tol.LAMBDA * math.sqrt(n) * u
        assert tol.gamma(n) >= n / 2 * u
        assert tol.blocked_gamma(n) <= tol.gamma(n) or n < 64


def test_product_roundoff():
    assert tol.product_roundoff("float16") == tol.product_roundoff("bfloat16", tf32=True) == 0.0
    assert tol.product_roundoff("float32") == tol.U_ACC
    assert tol.product_roundoff("float32", tf32=True) > 2 * tol.U_TF32
    with pytest.raises(ValueError, match="dtype"):
        tol.product_roundoff("int8")


def test_validation_messages():
    with pytest.raises(ValueError, match="rank-4"):
        v.validate_shapes("BTNH", "BSKH", (1, 2, 3), (1, 2, 3, 4), (1, 2, 3, 4))
    with pytest.raises(ValueError, match="every dimension"):
        v.validate_shapes("BTNH", "BSKH", (1, 0, 3, 4), (1, 2, 3, 4), (1, 2, 3, 4))
    dims = v.validate_shapes("BNTH", "BKSH", (2, 6, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8))
    assert dims == {"B": 2, "T": 5, "S": 7, "N": 6, "K": 3, "H": 8}
    assert v.resolve_scale(None, 16) == 0.25
    assert v.resolve_scale(np.float32(0.5), 16) == 0.5


def test_reference_softmax_rows_sum_to_one_and_causal_masks():
    rng = np.random.default_rng(0)
    q, k, val = rng.normal(size=(2, 3, 5, 4)), rng.normal(size=(2, 3, 7, 4)), rng.normal(size=(2, 3, 7, 4))
    out, p, _ = ref.attention(q, k, val, is_causal=True, layout="torch")
    np.testing.assert_allclose(p.sum(-1), 1.0)
    assert np.all(p[..., 0, 1:] == 0) and np.allclose(out[:, :, 0], val[:, :, 0])
