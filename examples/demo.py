"""Demo: a small GPT whose attention checks itself, in JAX (Flax nnx) and PyTorch.

    python -m examples.demo [--framework jax|torch|both] [--tiny] [--steps N] [--layer L] [--head N]

For each framework, on random tokens and a randomly initialised model:

1. a clean forward pass: no layer's report flags anything;
2. one bit flip (bit 30) in the attention scores S of layer ``--layer``, head
   ``--head``, at a (b, i, j) the causal mask lets through (j <= i): exactly
   that layer's report flags, and the checksums locate (i, j);
3. the same fault with ``on_fault="correct"``: the logits match the clean ones
   within 1e-4 · max|clean logits|;
4. a few Adam steps of next-token training on one fixed batch (scheme "full"):
   the loss stays finite and ends lower than it started, and no check flags.

Seeds are fixed, so the output is reproducible. Any failed expectation exits
non-zero (``SystemExit`` with the list of failures). ``main(argv)`` returns 0.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np

from ftattn_spec import CHECKS, Fault
from ftattn_spec.faults import SITE_CHECKS

SEED = 0
BIT = 30  # an exponent bit of the float32 score: a large error
REL_TOL = 1e-4  # corrected logits vs clean logits, relative to max |clean logits|
LEARNING_RATE = 3e-3


@dataclass(frozen=True)
class Size:
    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    seq_len: int  # T
    batch: int  # B
    steps: int

    def config(self):
        from examples.config import GPTConfig

        return GPTConfig(vocab=self.vocab, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                         n_kv_heads=self.n_kv_heads, max_len=self.seq_len)


TINY = Size(vocab=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=16, batch=2, steps=3)
DEFAULT = Size(vocab=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, seq_len=64, batch=4, steps=5)


class JaxRunner:
    """The Flax nnx model behind a framework-neutral interface (NumPy in, NumPy out)."""

    title = "JAX / Flax nnx (ftattn_jax.dot_product_attention)"

    def __init__(self, size: Size):
        import jax.numpy as jnp
        from flax import nnx

        from examples import gpt_flax

        self.g, self.jnp = gpt_flax, jnp
        cfg = size.config()
        self.model = gpt_flax.GPT(cfg, rngs=nnx.Rngs(SEED))

    def forward(self, tokens, on_fault="report", faults=None):
        logits, reports = self.model(self.jnp.asarray(tokens, self.jnp.int32), on_fault=on_fault, faults=faults)
        return np.asarray(logits), reports

    def train(self, tokens, steps):
        opt = self.g.make_optimizer(self.model, LEARNING_RATE)
        tokens = self.jnp.asarray(tokens, self.jnp.int32)
        for _ in range(steps):
            loss, detected = self.g.train_step(self.model, opt, tokens)
            yield float(loss), np.asarray(detected)


class TorchRunner:
    """The PyTorch model behind a framework-neutral interface (NumPy in, NumPy out)."""

    title = "PyTorch (ftattn_torch.scaled_dot_product_attention)"

    def __init__(self, size: Size):
        import torch

        from examples import gpt_torch

        self.g, self.torch = gpt_torch, torch
        cfg = size.config()
        torch.manual_seed(SEED)
        self.model = gpt_torch.GPT(cfg)

    def forward(self, tokens, on_fault="report", faults=None):
        with self.torch.no_grad():
            logits, reports = self.model(self.torch.from_numpy(np.asarray(tokens, np.int64)), on_fault=on_fault,
                                         faults=faults)
        return logits.numpy(), reports

    def train(self, tokens, steps):
        opt = self.g.make_optimizer(self.model, LEARNING_RATE)
        tokens = self.torch.from_numpy(np.asarray(tokens, np.int64))
        for _ in range(steps):
            loss, detected = self.g.train_step(self.model, opt, tokens)
            yield float(loss), detected.numpy()


RUNNERS = {"jax": JaxRunner, "torch": TorchRunner}


def _np(x) -> np.ndarray:
    """A report leaf (jax.Array or torch.Tensor) as a NumPy array."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def flagged_layers(reports) -> list[int]:
    """Indices of the layers whose report detected a fault."""
    return [i for i, r in enumerate(reports) if bool(_np(r.detected))]


def flagged_checks(report) -> list[str]:
    """Names of the checks that flagged anything, in ``CHECKS`` order."""
    return [name for name in CHECKS if name in report.checks and _np(report.checks[name].flagged).any()]


def fault_site(size: Size, head: int) -> tuple[int, int, int, int]:
    """A (b, n, i, j) of S under the causal mask (j <= i): the last batch row, late query, early key."""
    i = size.seq_len - 2
    return (size.batch - 1, head, i, i // 3)


class Checker:
    """Prints one aligned line per step and collects the failed expectations."""

    def __init__(self, framework: str):
        self.framework, self.failures, self.label = framework, [], ""

    def line(self, label: str, text: str, ok: bool | None = None) -> None:
        mark = "" if ok is None else ("ok" if ok else "FAIL")
        print(f"  {label:<14} {text:<64} {mark}".rstrip())
        self.label = label or self.label  # a continuation line ("" label) belongs to the step above
        if ok is False:
            self.failures.append(f"{self.framework}: {self.label}: {text}")


def run_framework(framework: str, size: Size, steps: int, layer: int, head: int) -> list[str]:
    """Steps 1–4 of the module docs for one framework; returns the failed expectations."""
    runner = RUNNERS[framework](size)
    c = Checker(framework)
    print(f"== {runner.title} ==")
    print(f"  {'model':<14} GPT vocab={size.vocab} D={size.d_model} layers={size.n_layers} N={size.n_heads} "
          f"K={size.n_kv_heads} H={size.d_model // size.n_heads}; batch B={size.batch}, T={size.seq_len}, float32")
    data = np.random.default_rng(SEED).integers(0, size.vocab, (size.batch, size.seq_len + 1))
    tokens = data[:, :size.seq_len]

    # 1. clean
    clean, reports = runner.forward(tokens)
    flagged = flagged_layers(reports)
    c.line("clean", f"flagged layers: {flagged or 'none'}", not flagged)

    # 2. one bit flip in S of the chosen layer and head
    b, n, i, j = fault_site(size, head)
    fault = Fault("scores", (b, n, i, j), bit=BIT)
    c.line("fault", f"layer {layer}: scores[b={b}, n={n}, i={i}, j={j}], bit {BIT} flipped")
    logits, reports = runner.forward(tokens, faults={layer: fault})
    flagged = flagged_layers(reports)
    c.line("report", f"flagged layers: {flagged or 'none'} (expected [{layer}])", flagged == [layer])
    checks = flagged_checks(reports[layer])
    c.line("", f"checks flagged in layer {layer}: {', '.join(checks) or 'none'}",
           bool(checks) and set(checks) <= set(SITE_CHECKS["scores"]))  # qk_row and/or qk_col
    located = tuple(int(x) for x in _np(reports[layer].located["scores"])[b, n])
    c.line("", f"located (row, col) in (b={b}, n={n}): {located} (expected {(i, j)})", located == (i, j))
    c.line("", f"max |logits - clean| = {np.abs(logits - clean).max():.3e} (uncorrected)")

    # 3. the same fault, corrected
    logits, reports = runner.forward(tokens, on_fault="correct", faults={layer: fault})
    err, tol = float(np.abs(logits - clean).max()), REL_TOL * float(np.abs(clean).max())
    corrected = int(_np(reports[layer].corrected))
    c.line("correct", f"flagged layers: {flagged_layers(reports) or 'none'}, repairs in layer {layer}: {corrected}",
           corrected >= 1)
    c.line("", f"max |logits - clean| = {err:.3e} <= tol {tol:.3e}", err <= tol)

    # 4. training on one fixed batch
    losses = []
    for step, (loss, detected) in enumerate(runner.train(data, steps), 1):
        losses.append(loss)
        flagged = [k for k, d in enumerate(detected) if d]
        c.line(f"train {step}/{steps}", f"loss {loss:.4f}   flagged layers: {flagged or 'none'}", not flagged)
    finite = all(math.isfinite(x) for x in losses)
    down = sum(a > b for a, b in zip(losses, losses[1:]))
    c.line("training", f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, finite, down at {down} of {steps - 1} steps",
           finite and losses[-1] < losses[0])
    print()
    return c.failures


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--framework", choices=("jax", "torch", "both"), default="both")
    p.add_argument("--tiny", action="store_true", help="a tiny model (seconds per framework)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 3 tiny, 5 otherwise)")
    p.add_argument("--layer", type=int, default=1, help="layer that gets the fault (default 1)")
    p.add_argument("--head", type=int, default=2, help="query head that gets the fault (default 2)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    size = TINY if args.tiny else DEFAULT
    steps = size.steps if args.steps is None else args.steps
    if steps < 2:
        raise SystemExit(f"--steps: expected at least 2 (to see the loss go down), got {steps}")
    if not 0 <= args.layer < size.n_layers:
        raise SystemExit(f"--layer: expected 0..{size.n_layers - 1}, got {args.layer}")
    if not 0 <= args.head < size.n_heads:
        raise SystemExit(f"--head: expected 0..{size.n_heads - 1}, got {args.head}")
    frameworks = ("jax", "torch") if args.framework == "both" else (args.framework,)
    failures = []
    for framework in frameworks:
        failures += run_framework(framework, size, steps, args.layer, args.head)
    if failures:
        raise SystemExit("demo: expectations failed:\n  " + "\n  ".join(failures))
    print(f"all expectations met ({', '.join(frameworks)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
