"""What the Flax and PyTorch GPT examples share: the config and the per-layer fault map (no framework)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ftattn_spec import Fault


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of the decoder (``d_model`` = N·H; GQA when ``n_kv_heads < n_heads``)."""

    vocab: int = 256
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    max_len: int = 64
    mlp_ratio: int = 4
    tie_embeddings: bool = True
    scheme: str = "full"  # ftattn scheme of every attention call

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model: expected a multiple of n_heads={self.n_heads}, got {self.d_model}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads: expected a divisor of n_heads={self.n_heads}, got {self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def layer_faults(faults: Mapping[int, Fault | None] | None, n_layers: int) -> list[Fault | None]:
    """``{layer: Fault or None}`` → one entry per layer (None: no fault there)."""
    faults = dict(faults or {})
    bad = [k for k in faults if not isinstance(k, int) or not 0 <= k < n_layers]
    if bad:
        raise ValueError(f"faults: expected layer indices in 0..{n_layers - 1}, got {bad}")
    return [faults.get(i) for i in range(n_layers)]
