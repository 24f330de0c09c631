"""Shape presets taken from the seed notebook, plus a CPU-sized one."""

from __future__ import annotations

from dataclasses import dataclass

SEED_LENGTHS: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)


@dataclass(frozen=True)
class Shape:
    """One attention problem size, in legend letters (see ``ftattn_spec.axes``)."""

    B: int
    N: int
    T: int
    S: int
    H: int
    K: int | None = None  # kv heads; None means K == N

    @property
    def kv_heads(self) -> int:
        return self.N if self.K is None else self.K

    def shape(self, layout: str) -> tuple[int, ...]:
        """Array shape for ``layout`` such as ``"BTNH"`` or ``"BKSH"``."""
        sizes = {"B": self.B, "N": self.N, "T": self.T, "S": self.S, "H": self.H,
                 "K": self.kv_heads}
        return tuple(sizes[a] for a in layout)

    def flops(self, is_causal: bool = False) -> float:
        """4·B·N·T·S·H (two GEMMs), halved when causal."""
        f = 4.0 * self.B * self.N * self.T * self.S * self.H
        return f / 2 if is_causal else f

    def label(self) -> str:
        k = "" if self.K is None else f" K={self.K}"
        return f"B={self.B} N={self.N}{k} T={self.T} S={self.S} H={self.H}"


PRESETS: dict[str, tuple[Shape, ...]] = {
    # Baseline_final, DMR_final, ABFT_* cells: batch 2, 32 heads of 128.
    "seed": tuple(Shape(2, 32, n, n, 128) for n in SEED_LENGTHS),
    # "attention with all ft technique": batch = 16384 / T, so tokens are constant.
    "seed-tokens": tuple(Shape(16384 // n, 32, n, n, 128) for n in SEED_LENGTHS),
    # "10 times average": 16 heads of 64, batch = 16384 / T.
    "seed-small-heads": tuple(Shape(16384 // n, 16, n, n, 64) for n in SEED_LENGTHS),
    # "warm up" cell.
    "warmup": (Shape(2, 32, 128, 128, 128),),
    # Runs in seconds on two CPU cores; axes have distinct sizes.
    "cpu": (
        Shape(2, 4, 64, 64, 32),
        Shape(1, 3, 37, 41, 16),
        Shape(2, 4, 128, 96, 64),
        Shape(1, 2, 256, 256, 64),
    ),
}

PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)


def preset(name: str) -> tuple[Shape, ...]:
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"preset: expected one of {PRESET_NAMES}, got {name!r}")
    return PRESETS[name]
