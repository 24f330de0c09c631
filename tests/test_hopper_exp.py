"""The Hopper kernel's ``softmax_exp`` arithmetic (``exp_tiles.hopper_tile_ratio``), run as plain JAX
on any machine: its Σ log₂ p within the tile bound of float64, its verdicts those of the portable
kernel's ``tile_ratio`` on clean and corrupted tiles, a stray masked probability failing its row;
and the kernel with the check lowering to Mosaic GPU for CUDA without a GPU. The kernel itself runs
in ``tests/test_mosaic.py``'s GPU class."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from ftattn_jax import fused  # noqa: E402
from ftattn_jax.fused import exp_tiles  # noqa: E402
from ftattn_spec import exp_checksum  # noqa: E402

BQ = 64  # the rows of a compute warpgroup
C = 0.125 * np.log2(np.e)


def _rows(x):
    return x[:, None]


def _tile(seed, width, spread, masked):
    """Raw scores ``s`` (−inf where masked), the kernel's probabilities, ``m·c`` and the mask."""
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((BQ, width)) * spread
    keep = rng.random((BQ, width)) > 0.3 if masked else np.ones((BQ, width), bool)
    keep[:, 0] = True  # every row attends something
    s = jnp.asarray(np.where(keep, s, -np.inf), jnp.float32)
    m = jnp.max(s, axis=1)
    p = jnp.exp2((s - m[:, None]) * C)
    return s, p, m * C, (jnp.asarray(keep) if masked else None)


@pytest.mark.parametrize("logs", exp_tiles.HOPPER_LOGS)
@pytest.mark.parametrize("width", [64, 128])
def test_log2_sum_within_the_tile_bound(logs, width):
    rng = np.random.default_rng(width)
    low = -exp_tiles.HOPPER_CLAMP.get(logs, exp_tiles.CLAMP)  # hopper_tile_ratio clamps there first
    x = np.concatenate([rng.uniform(low, 0, (BQ // 2, width)), rng.uniform(-1e-3, 0, (BQ // 2, width))])
    pc = jnp.asarray(np.exp2(x), jnp.float32)
    got = np.asarray(exp_tiles.hopper_log2_sum(pc, logs), np.float64)
    want = np.log2(np.asarray(pc, np.float64)).sum(axis=1)
    co = exp_checksum.exp_coefficients(width, 1000)
    bound = co.tile + co.arg * np.abs(want)  # the threshold without its mu term (no logit here)
    assert (np.abs(got - want) <= bound).all(), (np.abs(got - want).max(), bound.min())
    assert np.abs(got - want).max() > 0 or logs == "each"  # not the float64 value by accident


@pytest.mark.parametrize("logs", exp_tiles.HOPPER_LOGS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("spread", [1.0, 40.0])
def test_verdicts_match_the_portable_tile_ratio(logs, masked, spread):
    s, p, m_sc, keep = _tile(int(spread) + masked, 128, spread, masked)
    clean = exp_tiles.hopper_tile_ratio(s, p, C, m_sc, 128, 1000, keep=keep, rows=_rows, logs=logs)
    assert float(jnp.max(clean)) < 0.2
    np.testing.assert_allclose(clean, exp_tiles.tile_ratio(s, p, C, m_sc, 128, 1000), atol=0.05)
    rng = np.random.default_rng(3)
    # above the form's clamp (2⁻³¹ for "quads"): below it a fault cannot show in the output, and the
    # forms with a lower clamp may flag what "quads" does not
    floor = 2.0 ** (4 - exp_tiles.HOPPER_CLAMP.get(logs, exp_tiles.CLAMP))
    for factor in (2.0, 0.5, 1.25, 1.01):
        r = rng.integers(BQ, size=8)
        j = np.asarray([int(rng.choice(np.flatnonzero(np.asarray(p[i]) > floor))) for i in r])
        bad = p.at[r, j].multiply(factor)
        a = exp_tiles.hopper_tile_ratio(s, bad, C, m_sc, 128, 1000, keep=keep, rows=_rows, logs=logs)
        b = exp_tiles.tile_ratio(s, bad, C, m_sc, 128, 1000)
        flagged = np.flatnonzero(np.asarray(a) > 1.0)
        np.testing.assert_array_equal(flagged, np.flatnonzero(np.asarray(b) > 1.0))
        if factor != 1.01:  # a factor of 2^±1 or 1.25 is far above the floor (log₂ 1.25 = 0.32)
            np.testing.assert_array_equal(flagged, np.unique(r))


def test_a_stray_masked_probability_fails_its_row():
    s, p, m_sc, keep = _tile(5, 128, 1.0, True)
    i, j = 9, int(np.flatnonzero(~np.asarray(keep[9]))[0])
    bad = p.at[i, j].set(1e-30)  # far below anything the row sum sees, but not the exact 0 of a masked entry
    ratio = np.asarray(exp_tiles.hopper_tile_ratio(s, bad, C, m_sc, 128, 1000, keep=keep, rows=_rows))
    assert np.isinf(ratio[i]) and np.isfinite(np.delete(ratio, i)).all()


@pytest.mark.parametrize("logs", exp_tiles.HOPPER_LOGS)
def test_the_kernel_with_softmax_exp_lowers_for_cuda_anywhere(logs):
    """The Hopper kernel with ``softmax_exp`` (and with ``qk_row`` and ``pv_row``) traces and lowers to
    Mosaic GPU for CUDA without a GPU (the version gate of :func:`mosaic_kernel._lacks` is bypassed:
    lowering works on jax 0.10 too; running it is left to jax >= 0.11)."""
    if fused.compat.mosaic_gpu() is None:
        pytest.skip("this jaxlib has no Mosaic GPU")
    shapes = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((1, 200, 4, 128), (1, 300, 2, 128), (1, 300, 2, 128))]
    for causal, which in ((False, ("qk_row", "pv_row")), (True, ())):
        cfg = fused.config((1, 200, 4, 128), (1, 300, 2, 128), "bfloat16", scale=128**-0.5, causal=causal,
                           which=which, n_faults=0, blocks=fused.MosaicBlocks(), interpret=False)
        cfg = dataclasses.replace(cfg, exp=True, exp_logs=logs)
        text = jax.jit(lambda q, k, v: fused.launch(q, k, v, None, None, cfg)).trace(*shapes).lower(
            lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text.lower()
