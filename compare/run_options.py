"""The options of ``python -m compare.run``: its parser (every option with help and its default,
``choices`` where the set is fixed), the checks argparse cannot make (usage errors exit 2,
naming the option), and the arguments a parent passes on to a backend's worker process."""

from __future__ import annotations

import argparse

from ftattn_spec import implementations as catalogue
from ftattn_spec.inputs import DISTRIBUTIONS
from ftattn_spec.schemes import SCHEME_NAMES
from ftattn_spec.shapes import PRESET_NAMES

#: The fused implementations: the backend that offers each (the catalogue's).
FUSED = {i.name: i.backend for i in catalogue.CATALOGUE if i.fused}


DESCRIPTION = "python -m compare.run: run every scheme in both backends, time it, cross-check it."


def has_gpu() -> bool:
    """Does PyTorch or JAX see a GPU here?"""
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        pass
    try:
        import jax

        return jax.default_backend() == "gpu"
    except ImportError:
        return False


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m compare.run", description=DESCRIPTION,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", default=None, choices=PRESET_NAMES,
                    help="shapes to run; default: seed on a GPU, cpu otherwise")
    ap.add_argument("--schemes", default=",".join(SCHEME_NAMES), help=f"comma-separated, of {SCHEME_NAMES}")
    ap.add_argument("--backends", default="jax,torch", help="comma-separated: jax, torch")
    ap.add_argument("--implementations", default="unfused,triton,pallas",
                    help="comma-separated: unfused (both backends), triton (PyTorch's fused kernel), pallas (JAX's "
                         "fused kernel); the fused ones on a GPU only")
    ap.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"),
                    help="default: float16 on a GPU, float32 on a CPU (where jax.nn runs)")
    ap.add_argument("--dist", default="uniform", choices=DISTRIBUTIONS, help="input distribution")
    ap.add_argument("--causal", action="store_true", help="causal attention")
    ap.add_argument("--method", default="robust", choices=("robust", "notebook"),
                    help="robust: each framework's protocol (compare.timing: warm-up, then the median and quartiles); "
                         "notebook: the seed notebook's 10 calls without warm-up")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions")
    ap.add_argument("--input-sets", type=int, default=3, help="rotate this many input sets while timing")
    ap.add_argument("--seed", type=int, default=0, help="seed of the inputs")
    ap.add_argument("--out", default=None, help="output folder (default results/<timestamp>/)")
    ap.add_argument("--isolate", default="auto", choices=("auto", "process", "none"),
                    help="process: each backend in its own process; auto: process when more than one backend runs")
    ap.add_argument("--no-peers", dest="peers", action="store_false",
                    help="skip the peer kernels (SDPA backends, jax.nn.dot_product_attention)")
    ap.add_argument("--train", action="store_true",
                    help="also time forward plus backward (compare.train) at each shape: rows with pass fwd+bwd")
    ap.add_argument("--wide", action="store_true", help="every column in the table (the JSON has them all anyway)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap


def validate(args, ap) -> None:
    """Usage errors exit with status 2 and one line naming the option (``ap.error``)."""
    def one_of(name, value, allowed):
        if value not in allowed:
            ap.error(f"--{name}: expected one of {tuple(allowed)}, got {value!r}")

    for s in args.schemes.split(","):
        one_of("schemes", s, SCHEME_NAMES)
    for b in args.backends.split(","):
        one_of("backends", b, ("jax", "torch"))
    for i in args.implementations.split(","):
        one_of("implementations", i, ("unfused", *FUSED))
    if args.reps < 1 or args.warmup < 0 or args.input_sets < 1:
        ap.error(f"--reps >= 1, --warmup >= 0 and --input-sets >= 1 expected, got {args.reps}, {args.warmup}, "
                 f"{args.input_sets}")
    if args.preset in ("seed", "seed-tokens", "seed-small-heads") and not args.worker and not has_gpu():
        ap.error(f"--preset {args.preset}: needs a GPU (its shapes take gigabytes); use --preset cpu on this machine")


def forward(argv) -> list[str]:
    """The parent's arguments minus the ones the parent sets for the child."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--train":  # the parent runs the training rows
            continue
        if a in ("--out", "--preset", "--schemes", "--backends", "--worker", "--isolate"):
            skip = True
            continue
        if a.split("=", 1)[0] in ("--out", "--preset", "--schemes", "--backends", "--worker", "--isolate"):
            continue
        out.append(a)
    return out
