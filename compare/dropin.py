"""Time the drop-ins next to the functions they replace, with each mask form.

``python -m compare.dropin [--backends jax,torch] [--T 2048] [--dtype float16]``
prints one table: per framework and mask form, the plain function
(``jax.nn.dot_product_attention``, also pinned to cuDNN where it takes the
form, or ``F.scaled_dot_product_attention``) and ftattn's drop-in with its
defaults (scheme ``full``, and ``baseline`` unchecked; ``ran`` says which
implementation the default took), timed with the framework's protocol (``compare.timing.measure``),
in the same process. For PyTorch also ``torch.compile(fullgraph=True)`` of the
drop-in. ``decode`` is one query per sequence against T cached keys. On a machine
without a GPU it uses a small shape in float32.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from .run_options import has_gpu as _has_gpu
from .timing import measure

FORMS = ("causal", "padding", "hf-mask", "lengths", "window", "bias", "decode")


def _masks(B, N, T, rng):
    """Each form's arguments; ``decode``: one query per sequence against a cache of T keys."""
    lengths = np.array([T, T // 2] * (B // 2) + [T] * (B % 2), np.int32)
    pad = np.arange(T)[None, :] < lengths[:, None]  # B S: keys beyond the length masked
    causal = np.arange(T)[None, :] <= np.arange(T)[:, None]
    return {
        "causal": {},
        "padding": dict(mask=np.broadcast_to(pad[:, None, None, :], (B, 1, T, T)).copy()),
        # what Hugging Face builds for a left-padded batch: padding and causal in one (B, 1, T, S) mask
        "hf-mask": dict(mask=(causal[None, None] & pad[:, ::-1][:, None, None, :])),
        "lengths": dict(lengths=lengths),
        "window": dict(window=(256, 0)),
        "bias": dict(bias=(0.1 * rng.standard_normal((1, N, T, T))).astype(np.float32)),
        "decode": dict(decode=True, lengths=lengths),
    }


def run_jax(B, N, T, H, dtype, rows):
    import jax
    import jax.numpy as jnp

    import ftattn_jax

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, N, H)), dtype) for _ in range(3))
    gpu = jax.default_backend() == "gpu"
    for form, m in _masks(B, N, T, rng).items():
        kw = dict(is_causal=form in ("causal", "window"))
        qq = q[:, -1:] if m.get("decode") else q
        if "mask" in m:
            kw["mask"] = jnp.asarray(m["mask"])
        if "bias" in m:
            kw["bias"] = jnp.asarray(m["bias"], dtype)
        if "window" in m:
            kw["local_window_size"] = m["window"]
        if "lengths" in m:
            kw["key_value_seq_lengths"] = jnp.asarray(m["lengths"])
            if not m.get("decode"):
                kw["query_seq_lengths"] = jnp.asarray(m["lengths"])
        fns = {"jax.nn": jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, **kw)),
               "jax.nn cudnn": jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn",
                                                                                    **kw))}
        for scheme in ("baseline", "full"):
            fns[f"ftattn {scheme}"] = jax.jit(
                lambda q, k, v, s=scheme: ftattn_jax.dot_product_attention(q, k, v, scheme=s, **kw))
        _, rep = ftattn_jax.dot_product_attention(qq, k, v, return_report=True, **kw)
        for name, fn in fns.items():
            try:
                ms = measure(fn, [(qq, k, v)], backend_name="jax", on_gpu=gpu, sync=jax.block_until_ready)["ms"]
            except Exception as e:  # noqa: BLE001 - cuDNN refuses some forms: say so, go on
                print(f"jax {form} {name}: not run ({type(e).__name__}: {str(e).splitlines()[0][:90]})")
                continue
            rows.append(("jax", form, name, ms, rep.ran.implementation if name.startswith("ftattn") else ""))
        jax.clear_caches()


def run_torch(B, N, T, H, dtype, rows):
    import torch
    import torch.nn.functional as F

    import ftattn_torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(0)
    q, k, v = (torch.tensor(rng.standard_normal((B, N, T, H)), device=dev, dtype=getattr(torch, dtype))
               for _ in range(3))
    for form, m in _masks(B, N, T, rng).items():
        am, causal = None, form == "causal"
        qq = q[:, :, -1:] if m.get("decode") else q
        if "mask" in m:
            am = torch.from_numpy(m["mask"]).to(dev)
        if "bias" in m:
            am = torch.from_numpy(m["bias"]).to(dev, q.dtype)
        if "lengths" in m:  # SDPA has no lengths: a (B, 1, T|1, S) boolean mask
            lens = torch.from_numpy(m["lengths"]).to(dev)
            keys = torch.arange(T, device=dev)[None, :] < lens[:, None]
            am = keys[:, None, None, :] if m.get("decode") else keys[:, None, :, None] & keys[:, None, None, :]
        if "window" in m:  # SDPA has no window argument: a boolean band mask
            i, j = torch.arange(T, device=dev)[:, None], torch.arange(T, device=dev)[None, :]
            am = (j <= i) & (j >= i - m["window"][0])
        fns = {"F.sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, am, is_causal=causal)}
        for scheme in ("baseline", "full"):
            fns[f"ftattn {scheme}"] = lambda q, k, v, s=scheme: ftattn_torch.scaled_dot_product_attention(
                q, k, v, am, is_causal=causal, scheme=s)
        _, rep = ftattn_torch.scaled_dot_product_attention(qq, k, v, am, is_causal=causal, return_report=True)
        torch._dynamo.reset()
        fns["ftattn full, compiled"] = torch.compile(fns["ftattn full"], fullgraph=True)
        for name, fn in fns.items():
            ms = measure(fn, [(qq, k, v)], backend_name="torch", on_gpu=dev == "cuda", sync=lambda r: None,
                         torch=torch)["ms"]
            rows.append(("torch", form, name, ms, rep.ran.implementation if name.startswith("ftattn") else ""))
        del fns


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m compare.dropin", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backends", "--framework", dest="framework", default="jax,torch",
                   choices=("jax", "torch", "jax,torch", "torch,jax", "both"), metavar="jax,torch",
                   help="which frameworks (the name every compare command uses; --framework is the old one)")
    p.add_argument("--B", type=int, default=None, help="default 2 on a GPU, 1 on a CPU")
    p.add_argument("--N", type=int, default=None, help="default 16 on a GPU, 2 on a CPU")
    p.add_argument("--T", type=int, default=None, help="default 2048 on a GPU, 128 on a CPU")
    p.add_argument("--H", type=int, default=None, help="default 128 on a GPU, 32 on a CPU")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="default float16 on a GPU, float32 elsewhere (XLA:CPU has no float16 dot with a "
                        "float32 result, which jax.nn asks for under jit)")
    a = p.parse_args(argv)
    gpu = _has_gpu()
    B, N, T, H = (a.B or (2 if gpu else 1), a.N or (16 if gpu else 2), a.T or (2048 if gpu else 128),
                  a.H or (128 if gpu else 32))
    for name, n in (("--B", B), ("--N", N), ("--T", T), ("--H", H)):
        if n < 1:
            p.error(f"{name}: expected >= 1, got {n}")
    a.dtype = a.dtype or ("float16" if gpu else "float32")
    rows: list = []
    t0 = time.perf_counter()
    if "jax" in a.framework or a.framework == "both":
        run_jax(B, N, T, H, a.dtype, rows)
    if "torch" in a.framework or a.framework == "both":
        run_torch(B, N, T, H, a.dtype, rows)
    print(f"B={B} N={N} T=S={T} H={H} {a.dtype}; median of 10 calls after 3 warm-ups "
          f"({time.perf_counter() - t0:.0f} s in all)")
    print(f"{'framework':<10}{'mask':<9}{'function':<24}{'ms':>9}{'x plain':>9}  ran")
    plain = {(f, m): ms for f, m, n, ms, _ in rows if n in ("jax.nn", "F.sdpa")}
    for f, m, n, ms, ran in rows:
        ratio = f"{ms / plain[(f, m)]:>9.2f}" if (f, m) in plain else f"{'-':>9}"  # the plain peer did not run
        print(f"{f:<10}{m:<9}{n:<24}{ms:>9.3f}{ratio}  {ran}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
