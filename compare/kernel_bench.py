"""The fused Triton kernel beside PyTorch's fastest attention, on a GPU.

``python -m compare.kernel_bench`` times, in one process and on the same
inputs: SDPA pinned to cuDNN and to flash, ``ftattn_torch.attention`` with
``implementation="triton"`` (``full``, and ``baseline``), and the forward
kernel alone with the checks on and compiled out (no report assembly). It
prints milliseconds, TFLOP/s (4·B·N·T·S·H, halved for causal) and ratios to
cuDNN, the extra memory of the checks, and the count of ``ex2`` instructions
in the compiled kernel with and without the checks (the softmax replica must
double them). ``--sweep`` times block shapes of the kernel alone.
Timing: PyTorch's protocol of every ``compare`` command (``compare.timing.measure``: CUDA
events, the median of 50 calls after 10 warm-ups).
"""

from __future__ import annotations

import argparse
import re
import sys

from . import results, timing


def add_shape_arguments(p: argparse.ArgumentParser) -> None:
    """The shape options both kernel benchmarks take (this one and ``compare.pallas_bench``)."""
    p.add_argument("--batch", type=int, default=2, help="B")
    p.add_argument("--heads", type=int, default=32, help="N, query heads")
    p.add_argument("--kv-heads", type=int, default=None, help="K, kv heads (default: N)")
    p.add_argument("--head-dim", type=int, default=128, help="H")
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 8192], help="T = S, one or more")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"), help="input dtype")
    p.add_argument("--causal", action="store_true", help="causal attention")


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m compare.kernel_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_shape_arguments(p)
    p.add_argument("--sweep", action="store_true", help="time block shapes of the kernel alone")
    p.add_argument("--json", default=None, help="also write the rows to this file (compare's results schema)")
    return p.parse_args(argv)


#: Block shapes ``--sweep`` tries: (block_m, block_n, warps, stages).
SWEEP = ((128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3),
         (128, 128, 8, 3), (64, 128, 4, 2))


def count_ex2(compiled) -> int:
    """``ex2`` instructions in a compiled kernel's PTX."""
    return len(re.findall(r"\bex2\.approx", compiled.asm["ptx"]))


def count_fma(compiled) -> int:
    """float32 ``fma`` instructions in a compiled kernel's PTX."""
    return len(re.findall(r"\bfma\.rn\.f32", compiled.asm["ptx"]))


def main(argv=None) -> int:
    import torch
    import triton  # noqa: F401 - the kernel benchmark needs it (a clear ImportError otherwise)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import ftattn_torch
    from ftattn_torch import fused

    a = _parse(argv)
    if not torch.cuda.is_available():
        print("compare.kernel_bench: no CUDA device; nothing to time")
        return 0
    dt = getattr(torch, a.dtype)
    B, N, H = a.batch, a.heads, a.head_dim
    K = a.kv_heads or N
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
          f"B={B} N={N} K={K} H={H} {a.dtype} causal={a.causal}")
    rows = []
    for T in a.seq:
        S = T
        g = torch.Generator(device=dev).manual_seed(T)
        q = torch.randn(B, N, T, H, device=dev, dtype=dt, generator=g)
        k = torch.randn(B, K, S, H, device=dev, dtype=dt, generator=g)
        v = torch.randn(B, K, S, H, device=dev, dtype=dt, generator=g)
        scale = H ** -0.5
        flop = 4.0 * B * N * T * S * H * (0.5 if a.causal else 1.0)

        def sdpa(kind):
            def fn():
                with sdpa_kernel([kind]):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=a.causal,
                                                                            enable_gqa=K != N)
            return fn

        def api(scheme):
            return lambda: ftattn_torch.attention(q, k, v, scheme=scheme, is_causal=a.causal,
                                                  implementation="triton")

        def kernel(checks_on, blocks=None, which=None):
            return lambda: fused.forward(q, k, v, scale=scale, is_causal=a.causal, checks_on=checks_on,
                                         blocks=blocks, which=which)

        cands = {"sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
                 "triton full (api)": api("full"), "triton baseline (api)": api("baseline"),
                 "triton kernel checks on": kernel(True), "triton kernel checks off": kernel(False)}
        default = fused.BlockSizes.get_default(False)
        for check in ("qk_row", "softmax_dmr", "pv_row"):
            cands[f"triton kernel {check} only"] = kernel(True, which=(check,))
        cands["triton kernel, FMA-pipe replica"] = kernel(True, fused.BlockSizes(
            default.block_m, default.block_n, default.num_warps, default.num_stages, "fma"))
        if a.sweep:
            del cands["sdpa-flash"], cands["triton baseline (api)"]
        if a.sweep:
            for bm, bn, w, st in SWEEP:
                for rep in ("fma", "mufu"):
                    cands[f"on-{rep} {bm}x{bn} w{w} s{st}"] = kernel(True, fused.BlockSizes(bm, bn, w, st, rep))
                cands[f"off {bm}x{bn} w{w} s{st}"] = kernel(False, fused.BlockSizes(bm, bn, w, st))
        base = None
        res = {}
        for name, fn in cands.items():
            try:
                fn()
                torch.cuda.synchronize()
                ms = timing.measure(fn, [()], backend_name="torch", on_gpu=True, sync=lambda r: None,
                                    torch=torch, warmup=10, reps=50)["ms"]
            except Exception as e:  # noqa: BLE001  (a config that does not compile is reported, not fatal)
                print(f"T={T} {name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                continue
            res[name] = ms
            if name == "sdpa-cudnn":
                base = ms
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                               is_causal=a.causal, enable_gqa=K != N)
        out, rep = ftattn_torch.attention(q, k, v, is_causal=a.causal, implementation="triton")
        err = (out.float() - ref).abs().max().item()
        ratios = {n: c.residual.div(c.threshold).max().item() for n, c in rep.checks.items()}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        m0 = torch.cuda.memory_allocated()
        fused.forward(q, k, v, scale=scale, is_causal=a.causal, checks_on=False)
        torch.cuda.synchronize()
        off_mem = torch.cuda.max_memory_allocated() - m0
        torch.cuda.reset_peak_memory_stats()
        ftattn_torch.attention(q, k, v, is_causal=a.causal, implementation="triton")
        torch.cuda.synchronize()
        on_mem = torch.cuda.max_memory_allocated() - m0
        c_fma = fused.forward(q, k, v, scale=scale, is_causal=a.causal, checks_on=True,
                              blocks=fused.BlockSizes(default.block_m, default.block_n, default.num_warps,
                                                      default.num_stages, "fma"))[-1]
        c_mufu = fused.forward(q, k, v, scale=scale, is_causal=a.causal, checks_on=True, blocks=default)[-1]
        c_off = fused.forward(q, k, v, scale=scale, is_causal=a.causal, checks_on=False)[-1]
        counts = {n: (count_ex2(c), count_fma(c)) for n, c in (("on-fma", c_fma), ("on-mufu", c_mufu),
                                                                 ("off", c_off))}
        print(f"\nT=S={T}: max |out - fp32 SDPA| {err:.3g}; clean max residual/threshold {ratios}; "
              f"detected {bool(rep.detected)}")
        print(f"  memory beyond q,k,v: checks off {off_mem / 2**20:.1f} MiB, full (api) {on_mem / 2**20:.1f} MiB; "
              f"(ex2, fma.f32) in PTX: {counts}")
        print(f"  {'row':34s} {'ms':>8s} {'TFLOP/s':>8s} {'x cuDNN':>8s}")
        for name, ms in sorted(res.items(), key=lambda x: x[1]) if a.sweep else res.items():
            tf = flop / ms / 1e9
            print(f"  {name:34s} {ms:8.3f} {tf:8.1f} {base / ms if base else float('nan'):8.3f}")
            rows.append({"T": T, "row": name, "ms": ms, "tflops": tf})
        if "triton kernel checks on" in res and "triton kernel checks off" in res:
            print(f"  overhead of the checks (kernel): "
                  f"{res['triton kernel checks on'] / res['triton kernel checks off'] - 1:+.1%}; "
                  f"api full vs kernel off: {res['triton full (api)'] / res['triton kernel checks off'] - 1:+.1%}")
    if a.json:
        env = {"torch": {"torch": torch.__version__, "triton": triton.__version__,
                         "device": torch.cuda.get_device_name()}}
        results.save(a.json, results.document("kernel-bench", vars(a), env, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
