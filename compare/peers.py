"""The attention a user would pick instead of ftattn, timed in the same run.

PyTorch: ``scaled_dot_product_attention`` pinned to each backend in turn
(cuDNN, flash, memory-efficient, math). JAX: ``jax.nn.dot_product_attention``
with ``implementation="xla"`` and ``"cudnn"``. Both: the seed notebook's own
formulations, ``notebook-baseline`` (``softmax(Q·Kᵀ·scale)·V`` in the input
dtype, as its baseline cells) and ``notebook-all-ft`` (its "attention with all
ft technique" cell: checksums computed and never compared, and
``softmax(softmax(S))``, so its output is wrong by design). A peer that cannot
run here (no GPU, unsupported dtype or shape) is skipped with its reason.
Peers are unprotected: their rows have no verdicts, and their output error is
reported, not judged.
"""

from __future__ import annotations

NOTEBOOK: tuple[str, ...] = ("notebook-baseline", "notebook-all-ft")
TORCH_PEERS: tuple[str, ...] = ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math") + NOTEBOOK
JAX_PEERS: tuple[str, ...] = ("jax-xla", "jax-cudnn") + NOTEBOOK


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

        def expand(q, x):  # the notebook has one kv head per query head
            return x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) if x.shape[1] != q.shape[1] else x

        def nb_baseline(q, k, v, is_causal):
            s = torch.matmul(q, expand(q, k).transpose(-1, -2)) * q.shape[-1] ** -0.5
            if is_causal:
                s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
            return torch.matmul(torch.softmax(s, dim=-1), expand(q, v))

        def nb_all_ft(q, k, v, is_causal):
            k, v = expand(q, k), expand(q, v)
            scale = q.shape[-1] ** -0.5
            k_t = k.transpose(-1, -2)
            k_check = k_t.sum(dim=-1, keepdim=True)
            s = torch.matmul(q, k_t) * scale
            s_check = torch.matmul(q, k_check) * scale
            if is_causal:
                s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
            p = torch.softmax(torch.softmax(s, dim=-1), dim=-1)
            v_check = v.sum(dim=-1, keepdim=True)
            out = torch.matmul(p, v)
            out_check = torch.matmul(p, v_check)
            return out, s_check, out_check  # the notebook kept the checks alive by summing them

        peers = {name: make(kind) for name, kind in kinds.items()}
        peers["notebook-baseline"] = nb_baseline
        peers["notebook-all-ft"] = lambda q, k, v, c: nb_all_ft(q, k, v, c)[0]
        return peers
    jax = backend.jax
    jnp = backend.jnp

    def make_jax(impl):
        f = jax.jit(lambda q, k, v, c: jax.nn.dot_product_attention(q, k, v, is_causal=c, implementation=impl),
                    static_argnums=3)
        return lambda q, k, v, is_causal: f(q, k, v, is_causal)

    def nb_jax(all_ft: bool):
        def f(q, k, v, is_causal):  # q: B T N H, k/v: B S K H
            g = q.shape[2] // k.shape[2]
            k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
            scale = q.shape[-1] ** -0.5
            s = jnp.einsum("btnh,bsnh->bnts", q, k) * jnp.asarray(scale, q.dtype)
            if is_causal:
                s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
            p = jax.nn.softmax(s, axis=-1)
            if not all_ft:
                return jnp.einsum("bnts,bsnh->btnh", p, v)
            s_check = jnp.einsum("btnh,bnh->bnt", q, k.sum(1)) * scale
            p = jax.nn.softmax(p, axis=-1)
            out = jnp.einsum("bnts,bsnh->btnh", p, v)
            out_check = jnp.einsum("bnts,bsn->bnt", p, v.sum(-1))
            return out, s_check, out_check

        jf = jax.jit(f, static_argnums=3)
        return (lambda q, k, v, c: jf(q, k, v, c)[0]) if all_ft else (lambda q, k, v, c: jf(q, k, v, c))

    return {"jax-xla": make_jax("xla"), "jax-cudnn": make_jax("cudnn"),
            "notebook-baseline": nb_jax(False), "notebook-all-ft": nb_jax(True)}


#: peers that need a GPU (on a CPU their libraries refuse with messages about backends; PyTorch has
#: a flash kernel for CPUs)
GPU_ONLY: tuple[str, ...] = ("sdpa-cudnn", "sdpa-efficient", "jax-cudnn")


def skip_reason(name: str, error: Exception, *, on_gpu: bool) -> str:
    """Why peer ``name`` did not run, for the table: ``"needs a GPU"`` where that is the reason,
    out of memory, or the library's first line (at most 120 characters)."""
    text = str(error).splitlines()[0][:120] if str(error) else ""
    if not on_gpu and name in GPU_ONLY:
        return "needs a GPU"
    if "out of memory" in str(error).lower() or "RESOURCE_EXHAUSTED" in str(error):
        return "out of device memory"
    return f"{type(error).__name__}: {text}"
