"""The fused kernels as their compilers see them, readable on any machine.

:func:`triton_ir` is the Triton IR that Pallas emits for the portable kernel;
:func:`mosaic_ir` the Mosaic GPU module of the Hopper kernel. Both lower the
kernel for CUDA without a GPU. The tests that count the softmax replica's
exponentials read them (``docs/kernels.md``, "Testing the compiled kernel").
"""

from __future__ import annotations

import contextlib
import dataclasses
import io

import jax

from ftattn_spec.implementations import run_checks

from . import compat
from . import mosaic_kernel as mosaic
from . import pallas_backward as backward
from . import pallas_kernel as portable
from .mosaic_kernel import MosaicBlocks
from .pallas_kernel import BlockSizes


def triton_ir(q_shape, k_shape, dtype: str, *, scheme: str, is_causal: bool = False,
              blocks: BlockSizes | None = None) -> str:
    """The Triton IR (TTIR text) that Pallas emits for the kernel, lowered for CUDA.

    Works without a GPU (a cross-platform lowering). Used by the test that
    compiles the IR with Triton and counts the exponentials of the softmax
    replica (docs/kernels.md, "Testing the compiled kernel").
    """
    bs = blocks or BlockSizes.get_default(False, q_shape[-1], True)
    cfg = portable.config(q_shape, k_shape, dtype, scale=q_shape[-1] ** -0.5, causal=is_causal,
                          which=run_checks("pallas", scheme), n_faults=0, blocks=bs, interpret=False, debug=True)
    shapes = [jax.ShapeDtypeStruct(s, dtype) for s in (q_shape, k_shape, k_shape)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), compat.quiet_lowering():
        jax.jit(lambda q, k, v: portable.launch(q, k, v, None, None, cfg)).trace(*shapes).lower(
            lowering_platforms=("cuda",))
    text = buf.getvalue()
    marker = "The Triton module for pallas_call"
    if marker not in text:
        raise RuntimeError("Pallas printed no Triton module while lowering the kernel")
    start = text.index("\n", text.index(marker)) + 1
    return text[start:]


def backward_triton_ir(q_shape, k_shape, dtype: str, *, checks: bool, is_causal: bool = True,
                       blocks: "backward.BackwardBlocks | None" = None) -> dict[str, str]:
    """The Triton IR of the two fused backward kernels (:mod:`.pallas_backward`), lowered for
    CUDA on any machine: ``{"dkdv": ttir, "dq": ttir}``. The test that compiles them for sm_90
    without a GPU reads them."""
    B, T, N, H = q_shape
    fwd = portable.config(q_shape, k_shape, dtype, scale=H ** -0.5, causal=is_causal,
                          which=run_checks("pallas", "full"), n_faults=0,
                          blocks=BlockSizes.get_default(False, H, True), interpret=False)
    cfg = backward.backward_config(fwd, H, dtype, checks=checks, blocks=blocks)
    cfg = dataclasses.replace(cfg, debug=True)
    shapes = [jax.ShapeDtypeStruct(s, dtype) for s in (q_shape, k_shape, k_shape, q_shape)]
    shapes += [jax.ShapeDtypeStruct((B, N, T), "float32"), jax.ShapeDtypeStruct(q_shape, dtype)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), compat.quiet_lowering():
        jax.jit(lambda q, k, v, o, lse, do: backward.launch(q, k, v, o, lse, do, None, None, cfg,
                                                           portable.Masks())).trace(*shapes).lower(
            lowering_platforms=("cuda",))
    out = {}
    for part in buf.getvalue().split("The Triton module for pallas_call")[1:]:
        head, body = part.split("\n", 1)
        out["dkdv" if "backward_dkdv" in head else "dq"] = body
    if set(out) != {"dkdv", "dq"}:
        raise RuntimeError(f"Pallas printed {sorted(out)} while lowering the backward, expected dkdv and dq")
    return out


def mosaic_ir(q_shape, k_shape, dtype: str, *, scheme: str, is_causal: bool = False,
              blocks: MosaicBlocks | None = None) -> str:
    """The Mosaic GPU module (MLIR text) of the Hopper kernel, lowered for CUDA on any machine.

    Pallas serializes the kernel's module into the ``mosaic_gpu`` custom call;
    this reads it back. Used by the test that counts the softmax replica's
    exponentials (``docs/kernels.md``, "Testing the compiled kernel").
    """
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir

    bs = blocks or MosaicBlocks.get_default(False, q_shape[-1], True)
    cfg = mosaic.config(q_shape, k_shape, dtype, scale=q_shape[-1] ** -0.5, causal=is_causal,
                        which=run_checks("pallas", scheme), n_faults=0, blocks=bs)
    shapes = [jax.ShapeDtypeStruct(s, dtype) for s in (q_shape, k_shape, k_shape)]
    lowered = jax.jit(lambda q, k, v: mosaic.launch(q, k, v, None, None, cfg)).trace(*shapes).lower(
        lowering_platforms=("cuda",))
    calls = []

    def walk(op):
        for region in op.regions:
            for block in region:
                for o in block.operations:
                    if o.name == "stablehlo.custom_call" and "mosaic_gpu" in str(o.attributes["call_target_name"]):
                        calls.append(o)
                    walk(o)

    walk(lowered.compiler_ir("stablehlo").operation)
    if len(calls) != 1:
        raise RuntimeError(f"expected one mosaic_gpu custom call in the lowered kernel, found {len(calls)}")
    module = ir.StringAttr(calls[0].attributes["mhlo.backend_config"]["module"]).value_bytes
    ctx = jax_mlir.make_ir_context()
    try:  # the Mosaic GPU dialect's types (jax 0.11 serializes memrefs of them)
        from jax._src.lib import mosaic_gpu_dialect

        mosaic_gpu_dialect.register_dialect(ctx)
    except (ImportError, AttributeError):  # pragma: no cover - depends on the jaxlib
        pass
    ctx.allow_unregistered_dialects = True
    try:
        ctx.load_all_available_dialects()
    except AttributeError:  # pragma: no cover
        pass
    with ctx:
        return str(ir.Module.parse(bytes(module)))
