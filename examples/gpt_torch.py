"""A small GPT-style decoder in PyTorch whose attention is ftattn's.

Token and learned position embeddings, ``n_layers`` pre-LayerNorm blocks of
causal grouped-query self-attention and an MLP, a final LayerNorm and an
output head (tied to the token embedding by default). Every attention call
goes through ``ftattn_torch.scaled_dot_product_attention`` and returns a
report, so the model returns one ``ftattn_spec.Report`` per layer next to its
logits, and a fault can be injected into one chosen layer.

Dimension letters: B batch, T query length, S key length (= T here), N query
heads, K kv heads, H head dim, D model width, V vocabulary. Layout of the
attention inputs is SDPA's: query ``(B, N, T, H)``, key/value ``(B, K, S, H)``.

    torch.manual_seed(0)
    model = GPT(GPTConfig())
    logits, reports = model(tokens)                                  # (B, T, V), [Report] * n_layers
    logits, reports = model(tokens, on_fault="correct",
                            faults={1: Fault("scores", (0, 2, 9, 3), bit=30)})
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ftattn_torch
from examples.config import GPTConfig, layer_faults  # noqa: F401  (GPTConfig re-exported)
from ftattn_spec import Fault, Report


class CausalSelfAttention(nn.Module):
    """Grouped-query causal self-attention: N query heads share K kv heads."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        N, K, H, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
        self.n_heads, self.n_kv_heads, self.head_dim, self.scheme = N, K, H, cfg.scheme
        self.query = nn.Linear(D, N * H)
        self.key = nn.Linear(D, K * H)
        self.value = nn.Linear(D, K * H)
        self.out = nn.Linear(N * H, D)

    def forward(self, x: Tensor, *, on_fault: str = "report", fault: Fault | None = None) -> tuple[Tensor, Report]:
        """``x`` (B, T, D) → ``(y (B, T, D), report)``; ``fault`` is injected into this layer's attention."""
        B, T, _ = x.shape
        N, K, H = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.query(x).view(B, T, N, H).transpose(1, 2)  # (B, N, T, H)
        k = self.key(x).view(B, T, K, H).transpose(1, 2)  # (B, K, S, H), S = T
        v = self.value(x).view(B, T, K, H).transpose(1, 2)
        o, report = ftattn_torch.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True, scheme=self.scheme, on_fault=on_fault, fault=fault,
            return_report=True)
        return self.out(o.transpose(1, 2).reshape(B, T, N * H)), report


class MLP(nn.Module):
    """D → mlp_ratio·D → D with a GELU."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.down = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.attn = CausalSelfAttention(cfg)
        self.ln_mlp = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, *, on_fault: str = "report", fault: Fault | None = None) -> tuple[Tensor, Report]:
        a, report = self.attn(self.ln_attn(x), on_fault=on_fault, fault=fault)
        x = x + a
        return x + self.mlp(self.ln_mlp(x)), report


class GPT(nn.Module):
    """The decoder: tokens (B, T) int64 → ``(logits (B, T, V) float32, [Report] * n_layers)``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.apply(_init_weights)

    def forward(self, tokens: Tensor, *, on_fault: str = "report",
                faults: Mapping[int, Fault | None] | None = None) -> tuple[Tensor, list[Report]]:
        """Run the decoder. ``on_fault`` applies to every layer; ``faults`` maps a layer
        index to the ``Fault`` injected into that layer's attention (None or absent: none)."""
        B, T = tokens.shape
        if T > self.cfg.max_len:
            raise ValueError(f"tokens: expected at most max_len={self.cfg.max_len} positions, got T={T}")
        x = self.tok_emb(tokens) + self.pos_emb(torch.arange(T, device=tokens.device))[None]
        reports = []
        for block, fault in zip(self.blocks, layer_faults(faults, self.cfg.n_layers)):
            x, report = block(x, on_fault=on_fault, fault=fault)
            reports.append(report)
        x = self.ln_f(x)
        logits = F.linear(x, self.tok_emb.weight) if self.head is None else self.head(x)
        return logits, reports


def _init_weights(module: nn.Module) -> None:
    """GPT-2's initialisation: every weight N(0, 0.02), biases zero (LayerNorm keeps 1 and 0)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def next_token_loss(model: GPT, tokens: Tensor) -> tuple[Tensor, list[Report]]:
    """Mean cross-entropy of predicting ``tokens[:, 1:]`` from ``tokens[:, :-1]``; also the reports."""
    logits, reports = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    return loss, reports


def make_optimizer(model: GPT, learning_rate: float = 1e-2) -> torch.optim.Optimizer:
    """AdamW (no weight decay, so it matches the Flax example's Adam) over the model's parameters."""
    return torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)


def train_step(model: GPT, optimizer: torch.optim.Optimizer, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """One AdamW step on ``next_token_loss``: returns the loss before the step and the
    per-layer ``detected`` flags (bool ``(n_layers,)``) of its forward pass."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss, reports = next_token_loss(model, tokens)
    loss.backward()
    optimizer.step()
    return loss.detach(), torch.stack([r.detected for r in reports])
