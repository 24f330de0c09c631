"""The attention kernels a user would pick instead of ftattn, timed in the same run.

PyTorch: ``scaled_dot_product_attention`` pinned to each backend in turn
(cuDNN, flash, memory-efficient, math). JAX: ``jax.nn.dot_product_attention``
with ``implementation="xla"`` and ``"cudnn"``. A peer that cannot run here
(no GPU, unsupported dtype or shape) is skipped with its reason. Peers are
unprotected: their rows have no verdicts.
"""

from __future__ import annotations

TORCH_PEERS: tuple[str, ...] = ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math")
JAX_PEERS: tuple[str, ...] = ("jax-xla", "jax-cudnn")


def peers_for(backend) -> dict:
    """``{name: fn(q, k, v, is_causal) -> out}`` for an adapter of ``compare.backends``."""
    if backend.name == "torch":
        torch = backend.torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kinds = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
                 "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-math": SDPBackend.MATH}

        def make(kind):
            def fn(q, k, v, is_causal):
                with sdpa_kernel([kind]):
                    return torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, is_causal=is_causal, enable_gqa=k.shape[1] != q.shape[1])
            return fn

        return {name: make(kind) for name, kind in kinds.items()}
    jax = backend.jax

    def make_jax(impl):
        f = jax.jit(lambda q, k, v, c: jax.nn.dot_product_attention(q, k, v, is_causal=c, implementation=impl),
                    static_argnums=3)
        return lambda q, k, v, is_causal: f(q, k, v, is_causal)

    return {"jax-xla": make_jax("xla"), "jax-cudnn": make_jax("cudnn")}
