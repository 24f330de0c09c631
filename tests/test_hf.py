"""Hugging Face transformers with ``attn_implementation="ftattn"``: tiny randomly initialised
models (no downloads) against ``"sdpa"`` and ``"eager"``: logits with left and right padding,
greedy generation with a KV cache, a backward pass, per-layer counters."""

from __future__ import annotations

import copy
import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                                or importlib.util.find_spec("torch") is None,
                                reason="transformers (the [hf] extra) is not installed")

VOCAB, T = 97, 9


def _configs():
    import transformers as tf

    common = dict(vocab_size=VOCAB, max_position_embeddings=64)
    return {
        "llama": tf.LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                                num_key_value_heads=2, **common),
        "qwen2": tf.Qwen2Config(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                                num_key_value_heads=3, **common),
        "mistral": tf.MistralConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                                    num_key_value_heads=2, sliding_window=4, **common),
        "gpt2": tf.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=6, n_positions=64),
    }


def _models(name, *impls):
    import torch
    from transformers import AutoModelForCausalLM

    import ftattn_torch.hf

    ftattn_torch.hf.register()
    cfg = _configs()[name]
    torch.manual_seed(0)
    first = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impls[0]).eval()
    out = [first]
    for impl in impls[1:]:  # a config object per model: transformers records the implementation on it
        m = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()
        m.load_state_dict(first.state_dict())
        out.append(m)
    return out


def _batch(padding: str):
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    if padding == "left":
        mask[1, :3], mask[2, :1] = 0, 0
    elif padding == "right":
        mask[1, -3:], mask[2, -1:] = 0, 0
    return ids, mask


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gpt2"])
def test_logits_match_sdpa_and_eager(name, padding):
    import torch

    import ftattn_torch

    ft, sdpa, eager = _models(name, "ftattn", "sdpa", "eager")
    ids, mask = _batch(padding)
    ftattn_torch.counters.reset()
    with torch.no_grad():
        got = ft(ids, attention_mask=mask).logits
        want = [m(ids, attention_mask=mask).logits for m in (sdpa, eager)]
    keep = mask.bool()  # padded positions are not outputs anyone reads
    scale = float(want[0][keep].abs().max())
    for w in want:
        assert float((got - w)[keep].abs().max()) <= 1e-5 * scale
    counts = ftattn_torch.counters.read()
    assert {k: c["calls"] for k, c in counts.items() if k.startswith("layer")} == {"layer 0": 1, "layer 1": 1}
    assert all(c["detected"] == 0 for c in counts.values())


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_greedy_generate_with_a_kv_cache(name):
    import torch

    ft, sdpa = _models(name, "ftattn", "sdpa")
    ids, mask = _batch("left")
    with torch.no_grad():
        a = ft.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=True)
        b = sdpa.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(a, b)


def test_backward_pass_matches_sdpa():
    import torch

    ft, sdpa = _models("llama", "ftattn", "sdpa")
    ids, mask = _batch("right")
    grads = []
    for m in (ft, sdpa):
        m.train()
        m.zero_grad()
        m(ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][n], rtol=1e-4, atol=1e-6 * float(grads[1][n].abs().max()) + 1e-9)


def test_a_fault_in_a_layer_is_counted_and_follows_the_policy():
    """A model drops the report: the detection is counted under the layer, and the policy decides."""
    import torch

    import ftattn_torch
    from ftattn_spec import Fault, FaultDetected
    from ftattn_torch import hf

    hf.register("ftattn-raise-test", on_fault="report")
    (m,) = _models("llama", "ftattn")
    ids, mask = _batch("none")
    fault = Fault("scores", (0, 1, 4, 2), bit=30)
    # inject through the attention function directly (transformers passes no fault argument)
    fn = hf.make_attention_function()
    layer = m.model.layers[1].self_attn
    q = torch.randn(3, 6, T, 8)
    k = torch.randn(3, 2, T, 8)
    ftattn_torch.counters.reset()
    from ftattn_torch.sdpa import sdpa_call

    out, rep = sdpa_call(q, k, k, None, 0.0, True, None, True, fault=fault, takes_report=False, site=layer.layer_idx)
    assert bool(rep.detected) and ftattn_torch.counters.read()["layer 1"]["detected"] == 1
    with ftattn_torch.fault_policy("raise"), pytest.raises(FaultDetected):
        sdpa_call(q, k, k, None, 0.0, True, None, True, fault=fault, takes_report=False, site=1)
    out, _ = fn(layer, q, k, k, None)
    assert out.shape == (3, T, 6, 8)
