"""The examples: the demo at its tiny size, and a fault landing in the layer it was sent to."""

from __future__ import annotations

import numpy as np
import pytest

from ftattn_spec import Fault

from .conftest import HAVE_JAX, HAVE_TORCH

needs_jax = pytest.mark.skipif(not HAVE_JAX, reason="jax is not installed")
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed")

TINY = dict(vocab=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_len=12)
B, T = 2, 12


def _tokens() -> np.ndarray:
    return np.random.default_rng(1).integers(0, TINY["vocab"], (B, T))


def _flagged(reports) -> list[int]:
    return [i for i, r in enumerate(reports) if bool(np.asarray(r.detected))]


@needs_jax
def test_demo_jax_tiny(capsys):
    from examples import demo

    assert demo.main(["--framework", "jax", "--tiny"]) == 0
    assert "FAIL" not in capsys.readouterr().out


@needs_torch
def test_demo_torch_tiny(capsys):
    from examples import demo

    assert demo.main(["--framework", "torch", "--tiny"]) == 0
    assert "FAIL" not in capsys.readouterr().out


@needs_jax
@pytest.mark.parametrize("layer", [0, 2])
def test_flax_fault_report_names_the_layer(layer):
    import jax.numpy as jnp
    from flax import nnx

    from examples import gpt_flax

    model = gpt_flax.GPT(gpt_flax.GPTConfig(**TINY), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(_tokens(), jnp.int32)
    clean, reports = model(tokens)
    assert len(reports) == TINY["n_layers"] and _flagged(reports) == []
    fault = Fault("scores", (1, 3, 9, 2), bit=30)
    _, reports = model(tokens, faults={layer: fault, (layer + 1) % TINY["n_layers"]: None})
    assert _flagged(reports) == [layer]
    assert tuple(np.asarray(reports[layer].located["scores"])[1, 3]) == (9, 2)
    logits, reports = model(tokens, on_fault="correct", faults={layer: fault})
    assert int(reports[layer].corrected) >= 1
    np.testing.assert_allclose(np.asarray(logits), np.asarray(clean), rtol=0,
                               atol=1e-4 * float(jnp.abs(clean).max()))
    with pytest.raises(ValueError, match="layer indices"):
        model(tokens, faults={TINY["n_layers"]: fault})


@needs_torch
@pytest.mark.parametrize("layer", [0, 2])
def test_torch_fault_report_names_the_layer(layer):
    import torch

    from examples import gpt_torch

    torch.manual_seed(0)
    model = gpt_torch.GPT(gpt_torch.GPTConfig(**TINY))
    tokens = torch.from_numpy(_tokens())
    with torch.no_grad():
        clean, reports = model(tokens)
        assert len(reports) == TINY["n_layers"] and _flagged(reports) == []
        fault = Fault("scores", (1, 3, 9, 2), bit=30)
        _, reports = model(tokens, faults={layer: fault, (layer + 1) % TINY["n_layers"]: None})
        assert _flagged(reports) == [layer]
        assert tuple(reports[layer].located["scores"][1, 3].tolist()) == (9, 2)
        logits, reports = model(tokens, on_fault="correct", faults={layer: fault})
        assert int(reports[layer].corrected) >= 1
        torch.testing.assert_close(logits, clean, rtol=0, atol=1e-4 * float(clean.abs().max()))
        with pytest.raises(ValueError, match="layer indices"):
            model(tokens, faults={TINY["n_layers"]: fault})
