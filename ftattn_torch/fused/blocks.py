"""The forward kernel's tile shape and launch settings (:class:`BlockSizes`), and how its tiles of
K, V and the ``pv_row`` columns are read: pointers, or tensor descriptors (TMA) where those were
measured faster (docs/kernels.md, "Tensor descriptors in the Triton forward")."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

_REPLICAS = ("mufu", "fma")
_EXP_FORMS = ("fields", "pairs")  # as triton_exp.FORMS (not imported here: that module imports triton)


@dataclass(frozen=True)
class BlockSizes:
    """Tile shape and launch settings of the forward kernel.

    ``block_m`` query rows per program, ``block_n`` keys per tile (a multiple
    of the pre-pass chunk of the sums of K, ``tol.FUSED_CHUNK``, or smaller).
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    #: how the softmax replica evaluates its exponentials: ``"fma"`` (a
    #: polynomial on the FMA pipe) or ``"mufu"`` (the special-function unit,
    #: like the primary, with a different argument formula).
    replica: str = "mufu"
    #: how ``softmax_exp`` takes Σ log₂ p (``triton_exp.FORMS``): ``"fields"`` (exponent fields
    #: and a product of mantissas per tile) or ``"pairs"`` (two probabilities per logarithm;
    #: 30-80 points slower on the H200, docs/kernels.md, "Pairs of probabilities ... Triton")
    exp_logs: str = "fields"
    #: read the tiles of K, V and the ``pv_row`` columns through tensor descriptors (the copy
    #: engine, TMA, on Hopper) instead of pointers; needs the last axis contiguous and 16-byte
    #: aligned rows (``tma_reason``). docs/kernels.md, "Tensor descriptors in the Triton forward"
    tma: bool = False
    #: with ``tma``, also the narrow ``pv_row`` columns through a descriptor
    tma_vcol: bool = True

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            x = getattr(self, name)
            if not isinstance(x, int) or x < 16 or x & (x - 1):
                raise ValueError(f"blocks.{name}: expected a power of two >= 16, got {x!r}")
        if self.replica not in _REPLICAS:
            raise ValueError(f"blocks.replica: expected one of {_REPLICAS}, got {self.replica!r}")
        if self.exp_logs not in _EXP_FORMS:
            raise ValueError(f"blocks.exp_logs: expected one of {_EXP_FORMS}, got {self.exp_logs!r}")
        if not isinstance(self.tma, bool):
            raise TypeError(f"blocks.tma: expected a bool, got {self.tma!r}")

    @classmethod
    def get_default(cls, interpret: bool, checks: bool = True, T: int | None = None,
                    dense: bool = False) -> "BlockSizes":
        """Measured on an H100 (``python -m compare.kernel_bench --sweep``, docs/kernels.md).
        A short query (``T`` below 128: decoding) takes as few rows per program as cover it.
        ``dense``: a dense mask or bias is read tile by tile (more shared memory per stage)."""
        if interpret:  # the interpreter: small tiles run fastest on small tests
            return cls(16, 16, 1, 1)
        if T is not None and T < 128:
            bm = max(16, 1 << (int(T) - 1).bit_length())
            return cls(bm, 128, 4, 2)
        # with the checks, 128 keys per tile need more shared memory than an H200 has once the
        # 0/1 product of a masked tile is compiled in (262144 bytes at H=128); one stage
        # computed wrong results on the H200 (docs/kernels.md, "Masks")
        # without checks a dense mask or bias alone overflows it too at 128 keys (262144 bytes at
        # H=128, measured on the H200 by compare.dropin's "baseline" rows)
        return cls(128, 64, 8, 3) if checks or dense else cls(128, 128, 8, 3)


def tma_reason(*tensors) -> str | None:
    """Why these ``(B, KH, S, ·)`` views cannot be read through tensor descriptors, or None."""
    for x in tensors:
        size = x.element_size()
        if x.stride(-1) != 1:
            return f"the last axis has stride {x.stride(-1)}, not 1"
        if any((st * size) % 16 for st in x.stride()[:-1]) or x.data_ptr() % 16:
            return f"strides {tuple(x.stride())} of {size}-byte elements are not all 16-byte aligned"
    return None


def default_tma(bs: "BlockSizes", checks: bool, interpreting: bool, key, value) -> "BlockSizes":
    """The default reads: tensor descriptors for the kernel without checks on a Hopper GPU, where
    they made it 8-28% faster at 128 × 128 tiles; with the checks slower (H200, docs/kernels.md, "Tensor
    descriptors in the Triton forward"). Both read the same numbers: a choice of speed only."""
    if (checks or interpreting or key.device.type != "cuda" or bs.block_m < 128 or bs.block_n < 128
            or torch.cuda.get_device_capability(key.device)[0] < 9 or tma_reason(key, value) is not None):
        return bs
    return dataclasses.replace(bs, tma=True)


def descriptors(bs: "BlockSizes", key, value, vcol):
    """K, V and the pv_row columns as the kernel reads them: tensor descriptors with ``bs.tma``."""
    if not bs.tma:
        return key, value, vcol
    why = tma_reason(key, value, *(() if vcol is None or not bs.tma_vcol else (vcol,)))
    if why is not None:
        raise ValueError(f"blocks.tma: True needs tensor-descriptor operands, but {why}")
    from triton.tools.tensor_descriptor import TensorDescriptor

    def desc(x):
        return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, bs.block_n, x.shape[-1]])
    return desc(key), desc(value), None if vcol is None or not bs.tma_vcol else desc(vcol)


__all__ = ["BlockSizes", "default_tma", "descriptors", "tma_reason"]
