"""``python -m compare``: the commands, and which to use when.

``python -m compare <command> [options]`` runs one (the same as ``python -m
compare.<module>``); ``python -m compare <command> --help`` lists its options. Every
command exits 0 when all its checks hold, 1 when one failed (a false positive, an output
outside its bound, a miss at a protected site), 2 on a usage error.
"""

from __future__ import annotations

import importlib
import sys

#: (command, module, when to use it)
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("run", "run", "Start here. Every scheme in both backends, timed beside SDPA and jax.nn, outputs and "
                   "verdicts cross-checked; writes results.json, plot.png and plot.csv."),
    ("train", "train", "The cost of protection in training: forward plus backward and peak memory, beside SDPA "
                       "and jax.nn."),
    ("faults", "faults", "The fault scorecard: bit flips at every site of the forward, detected / harmless / "
                         "below the detection limit / missed, with bounds."),
    ("backward-faults", "backward_faults", "The same for the fused backward's sites."),
    ("report", "report", "Re-render the table and plot of a results.json."),
    ("dropin", "dropin", "The drop-ins (Hugging Face, Flax, torch.compile) against their own attention."),
    ("calibrate", "calibrate", "Clean-input residuals against thresholds: how much margin the tolerances leave."),
    ("kernel-bench", "kernel_bench", "The Triton kernel alone against SDPA (GPU; kernel work)."),
    ("pallas-bench", "pallas_bench", "The Pallas kernels alone against jax.nn (GPU; kernel work)."),
    ("mosaic-smoke", "mosaic_smoke", "Does the Hopper Mosaic kernel compile and run here (sm_90)."),
)


def usage() -> str:
    width = max(len(c) for c, _, _ in COMMANDS)
    lines = ["usage: python -m compare <command> [options]   (python -m compare <command> --help)", "",
             "commands:"]
    lines += [f"  {c:<{width}}  {text}" for c, _, text in COMMANDS]
    lines += ["", "exit status: 0 every check held, 1 a check failed, 2 a usage error"]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    modules = {c: m for c, m, _ in COMMANDS}
    name = argv[0]
    if name not in modules:
        print(f"python -m compare: command: expected one of {tuple(modules)}, got {name!r}\n\n{usage()}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"compare.{modules[name]}")
    try:
        code = module.main(argv[1:])
    except SystemExit as e:  # argparse: 0 for --help, 2 for a usage error
        code = e.code if isinstance(e.code, int) else (2 if e.code else 0)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
