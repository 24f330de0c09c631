"""The fused backward's tiles, shared by both backends' kernels (Triton in PyTorch, Pallas in JAX).

One frozen record, validated on construction, so an invalid tiling cannot reach a kernel and
both frameworks give one error text.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BackwardBlocks:
    """Tiles of both backward kernels: ``block_m`` query rows, ``block_n`` keys (powers of two,
    at least 16), and the launch's warps and pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            x = getattr(self, name)
            if not isinstance(x, int) or isinstance(x, bool) or x < 16 or x & (x - 1):
                raise ValueError(f"blocks.{name}: expected a power of two >= 16, got {x!r}")
        if not isinstance(self.num_warps, int) or isinstance(self.num_warps, bool) or self.num_warps < 1 \
                or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"blocks.num_warps: expected a power of two >= 1, got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or isinstance(self.num_stages, bool) or self.num_stages < 1:
            raise ValueError(f"blocks.num_stages: expected an int >= 1, got {self.num_stages!r}")

    @classmethod
    def get_default(cls, interpret: bool) -> "BackwardBlocks":
        """Interpret mode: small tiles (the interpreters' time grows with the tile); a GPU: 64×64
        with 4 warps and 2 stages, measured on the H200 for the Triton backward (docs/kernels.md)
        and used unchanged by the Pallas one."""
        return cls(16, 16, 1, 1) if interpret else cls(64, 64, 4, 2)
