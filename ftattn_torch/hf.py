"""Hugging Face transformers: ftattn as an attention implementation, ``attn_implementation="ftattn"``.

``register()`` adds ftattn to transformers' ``AttentionInterface`` (the attention
function) and ``AttentionMaskInterface`` (the mask function: SDPA's boolean
masks, which ftattn reads as SDPA does), so that::

    import ftattn_torch.hf
    ftattn_torch.hf.register()            # once; options as in scaled_dot_product_attention
    model = AutoModelForCausalLM.from_config(config, attn_implementation="ftattn")

runs every attention layer through ``ftattn_torch.scaled_dot_product_attention``
with the checks, grouped-query attention without repeating the kv heads, left
or right padding, sliding windows (through the mask) and KV caches. Each call is
counted in ``ftattn_torch.counters`` under ``"layer <layer_idx>"``; what a
detection does is the fault policy's (``ftattn_torch.fault_policy``), since a
model drops the report. Needs ``transformers`` (``pip install ftattn[hf]``).
"""

from __future__ import annotations

from ftattn_spec import validation as v

from .sdpa import sdpa_call

DEFAULT_NAME = "ftattn"


def make_attention_function(*, scheme: str = "full", granularity: str = "vector", on_fault: str = "report",
                            implementation: str | None = None):
    """The attention function transformers calls: ``(module, query, key, value, attention_mask,
    dropout, scaling, is_causal, **kwargs) -> (output (B, T, N, H), None)``."""
    v.validate_scheme(scheme)
    v.validate_granularity(granularity)
    v.validate_on_fault(on_fault)

    def ftattn_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                 scaling: float | None = None, is_causal: bool | None = None, **kwargs):
        if kwargs.get("softcap") is not None:
            raise ValueError("softcap: ftattn does not support logit soft-capping; use attn_implementation='eager'")
        if kwargs.get("position_bias") is not None:
            raise ValueError("position_bias: ftattn takes no position bias here; use attn_implementation='eager'")
        if dropout and getattr(module, "training", False):
            raise ValueError(f"dropout: ftattn applies no dropout to the attention probabilities, got {dropout!r} "
                             f"in training mode; set the model's attention dropout to 0.0")
        q_len, kv_len = query.shape[2], key.shape[2]
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(q_len > 1 and attention_mask is None and causal)
        if causal and kv_len > q_len:  # a prefill into an empty static cache: the later keys are unused
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        if attention_mask is not None and attention_mask.shape[-1] != key.shape[2]:
            attention_mask = attention_mask[..., : key.shape[2]]
        layer = getattr(module, "layer_idx", None)
        out, _ = sdpa_call(query, key, value, attention_mask, 0.0, causal, scaling, True, scheme=scheme,
                           granularity=granularity, on_fault=on_fault, takes_report=False,
                           implementation=implementation, site=None if layer is None else int(layer))
        return out.transpose(1, 2).contiguous(), None

    return ftattn_attention_forward


def register(name: str = DEFAULT_NAME, **options) -> str:
    """Register ftattn with transformers under ``name`` (options: ``scheme``, ``granularity``,
    ``on_fault``, ``implementation``); returns ``name``, for ``attn_implementation=``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty str, got {type(name).__name__} {name!r}")
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
    except ImportError as e:
        raise ImportError("ftattn_torch.hf needs transformers with its attention interface "
                          "(pip install 'ftattn[hf]')") from e
    AttentionInterface.register(name, make_attention_function(**options))
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
