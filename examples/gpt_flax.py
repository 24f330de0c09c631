"""A small GPT-style decoder in Flax nnx whose attention is ftattn's.

Token and learned position embeddings, ``n_layers`` pre-LayerNorm blocks of
causal grouped-query self-attention and an MLP, a final LayerNorm and an
output head (tied to the token embedding by default). Every attention call
goes through ``ftattn_jax.dot_product_attention`` and returns a report, so the
model returns one ``ftattn_spec.Report`` per layer next to its logits, and a
fault can be injected into one chosen layer.

Dimension letters: B batch, T query length, S key length (= T here), N query
heads, K kv heads, H head dim, D model width, V vocabulary. Layout of the
attention inputs is jax.nn's: query ``(B, T, N, H)``, key/value ``(B, S, K, H)``.

    model = GPT(GPTConfig(), rngs=nnx.Rngs(0))
    logits, reports = model(tokens)                                  # (B, T, V), [Report] * n_layers
    logits, reports = model(tokens, on_fault="correct",
                            faults={1: Fault("scores", (0, 2, 9, 3), bit=30)})
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import ftattn_jax
from examples.config import GPTConfig, layer_faults  # noqa: F401  (GPTConfig re-exported)
from ftattn_spec import Fault, Report

_INIT = nnx.initializers.normal(0.02)  # GPT-2's initialisation of every weight
_ZEROS = nnx.initializers.zeros_init()


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=use_bias, kernel_init=_INIT, bias_init=_ZEROS, rngs=rngs)


class CausalSelfAttention(nnx.Module):
    """Grouped-query causal self-attention: N query heads share K kv heads."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        N, K, H, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
        self.n_heads, self.n_kv_heads, self.head_dim, self.scheme = N, K, H, cfg.scheme
        self.query = _linear(D, N * H, rngs)
        self.key = _linear(D, K * H, rngs)
        self.value = _linear(D, K * H, rngs)
        self.out = _linear(N * H, D, rngs)

    def __call__(self, x: jax.Array, *, on_fault: str = "report",
                 fault: Fault | None = None) -> tuple[jax.Array, Report]:
        """``x`` (B, T, D) → ``(y (B, T, D), report)``; ``fault`` is injected into this layer's attention."""
        B, T, _ = x.shape
        N, K, H = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.query(x).reshape(B, T, N, H)
        k = self.key(x).reshape(B, T, K, H)  # S = T: self-attention
        v = self.value(x).reshape(B, T, K, H)
        o, report = ftattn_jax.dot_product_attention(q, k, v, is_causal=True, scheme=self.scheme,
                                                     on_fault=on_fault, fault=fault, return_report=True)
        return self.out(o.reshape(B, T, N * H)), report


class MLP(nnx.Module):
    """D → mlp_ratio·D → D with a GELU."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.up = _linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, rngs)
        self.down = _linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.ln_attn = nnx.LayerNorm(cfg.d_model, epsilon=1e-5, rngs=rngs)
        self.attn = CausalSelfAttention(cfg, rngs=rngs)
        self.ln_mlp = nnx.LayerNorm(cfg.d_model, epsilon=1e-5, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, *, on_fault: str = "report",
                 fault: Fault | None = None) -> tuple[jax.Array, Report]:
        a, report = self.attn(self.ln_attn(x), on_fault=on_fault, fault=fault)
        x = x + a
        return x + self.mlp(self.ln_mlp(x)), report


class GPT(nnx.Module):
    """The decoder: tokens (B, T) int → ``(logits (B, T, V) float32, [Report] * n_layers)``."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.tok_emb = nnx.Embed(cfg.vocab, cfg.d_model, embedding_init=_INIT, rngs=rngs)
        self.pos_emb = nnx.Embed(cfg.max_len, cfg.d_model, embedding_init=_INIT, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.ln_f = nnx.LayerNorm(cfg.d_model, epsilon=1e-5, rngs=rngs)
        self.head = None if cfg.tie_embeddings else _linear(cfg.d_model, cfg.vocab, rngs, use_bias=False)

    def __call__(self, tokens: jax.Array, *, on_fault: str = "report",
                 faults: Mapping[int, Fault | None] | None = None) -> tuple[jax.Array, list[Report]]:
        """Run the decoder. ``on_fault`` applies to every layer; ``faults`` maps a layer
        index to the ``Fault`` injected into that layer's attention (None or absent: none)."""
        B, T = tokens.shape
        if T > self.cfg.max_len:
            raise ValueError(f"tokens: expected at most max_len={self.cfg.max_len} positions, got T={T}")
        x = self.tok_emb(tokens) + self.pos_emb(jnp.arange(T))[None]
        reports = []
        for block, fault in zip(self.blocks, layer_faults(faults, self.cfg.n_layers)):
            x, report = block(x, on_fault=on_fault, fault=fault)
            reports.append(report)
        x = self.ln_f(x)
        logits = self.tok_emb.attend(x) if self.head is None else self.head(x)
        return logits, reports


def next_token_loss(model: GPT, tokens: jax.Array) -> tuple[jax.Array, list[Report]]:
    """Mean cross-entropy of predicting ``tokens[:, 1:]`` from ``tokens[:, :-1]``; aux: the reports."""
    logits, reports = model(tokens[:, :-1])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return loss, reports


def make_optimizer(model: GPT, learning_rate: float = 1e-2) -> nnx.Optimizer:
    """Adam over the model's parameters."""
    return nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)


@nnx.jit
def train_step(model: GPT, optimizer: nnx.Optimizer, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One Adam step on ``next_token_loss``: returns the loss before the step and the
    per-layer ``detected`` flags (bool ``(n_layers,)``) of its forward pass."""
    (loss, reports), grads = nnx.value_and_grad(next_token_loss, has_aux=True)(model, tokens)
    optimizer.update(model, grads)
    return loss, jnp.stack([r.detected for r in reports])
