"""Option handling of ``python -m compare.faults``: lists, ``--bits``, and ``--implementation``.

``--implementation`` names what one backend runs; the other keeps its unfused
path: ``triton`` is PyTorch's fused Triton kernel, ``pallas`` JAX's fused
Pallas kernel. Both kernels take float16 and bfloat16 only (every mask form),
and run the row checks only. Triton runs in its interpreter without a GPU, which needs
``TRITON_INTERPRET=1`` before anything imports triton (:func:`setup_implementation`
sets it); Pallas interprets by itself wherever JAX has no GPU.

A bad option raises :class:`UsageError`: exit status 2, argparse's for a usage error
(1 means a failed check, 0 that every check held).
"""

from __future__ import annotations

import os
import sys

from ftattn_spec import implementations as catalogue
from ftattn_spec.implementations import run_checks as implementation_checks

IMPLEMENTATIONS = tuple(dict.fromkeys(i.name for i in catalogue.CATALOGUE))
#: Input dtypes each implementation takes (the catalogue's).
IMPLEMENTATION_DTYPES = {i.name: i.dtypes for i in catalogue.CATALOGUE}
#: The backend that runs each fused implementation (the catalogue's).
IMPLEMENTATION_BACKEND = {i.name: i.backend for i in catalogue.CATALOGUE if i.fused}
_FRAMEWORK = {"torch": "PyTorch", "jax": "JAX"}


class UsageError(SystemExit):
    """A bad option, or one this machine cannot run: exit status 2 (argparse's), not 1 (a failed
    check). ``str()`` is the message, which names the option, what it expects and what it got.
    A ``SystemExit`` so that an uncaught one still ends ``python -m ...`` with status 2; the
    command's ``main`` prints the message to stderr (:func:`report_usage_error`) first."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def report_usage_error(parser, error: UsageError) -> None:
    """Print ``error`` as argparse prints its own: the usage line, then ``prog: error: message``."""
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {error}", file=sys.stderr)


def parse_list(text: str, allowed, what: str) -> list[str]:
    """``--what``: a comma-separated list, every item from ``allowed``; :class:`UsageError` otherwise."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise UsageError(f"--{what}: expected a comma-separated list from {tuple(allowed)}, got {text!r}")
    return items


def parse_bits(text: str | None):
    """``--bits``: comma-separated bit positions and ranges ``a-b`` (inclusive); None = every bit."""
    if text is None:
        return None
    bits = set()
    try:
        for part in (p.strip() for p in text.split(",")):
            if part:
                lo, _, hi = part.partition("-")
                bits.update(range(int(lo), int(hi if hi else lo) + 1))
    except ValueError:
        bits = set()
    if not bits or min(bits) < 0 or max(bits) > 31:
        raise UsageError(f"--bits: expected comma-separated bits or ranges a-b within 0-31, got {text!r}")
    return bits


def backend_implementations(implementation: str, names) -> dict[str, str]:
    """What each backend of ``names`` runs under ``--implementation``."""
    fused = IMPLEMENTATION_BACKEND.get(implementation)
    return {n: implementation if n == fused else "unfused" for n in names}


def restrict_dtypes(implementation: str, dtypes: list[str], text: str) -> tuple[list[str], list[str]]:
    """``(kept, dropped)``: the dtypes of ``--dtype`` (``text``) that ``implementation`` takes and the rest."""
    takes = IMPLEMENTATION_DTYPES[implementation]
    kept = [d for d in dtypes if d in takes]
    if not kept:
        raise UsageError(f"--dtype: --implementation {implementation} takes {takes}, got {text!r}")
    return kept, [d for d in dtypes if d not in takes]


def _torch_has_cuda() -> bool:
    """Whether PyTorch sees a CUDA GPU. Importing torch does not import triton."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def setup_implementation(args, names) -> None:
    """Check the options a fused ``--implementation`` allows. For triton without a GPU, select
    Triton's interpreter (``TRITON_INTERPRET=1``): call this before anything imports triton."""
    impl = args.implementation
    if impl not in IMPLEMENTATION_BACKEND:
        return
    backend = IMPLEMENTATION_BACKEND[impl]
    if backend not in names:
        raise UsageError(f"--implementation: {impl} is a {_FRAMEWORK[backend]} implementation; --backends "
                         f"{args.backends!r} has no {backend}")
    try:
        implementation_checks(impl, args.scheme)
    except ValueError as e:
        raise UsageError(f"--scheme: {e}") from None
    if impl == "triton" and not _torch_has_cuda():
        os.environ["TRITON_INTERPRET"] = "1"


def check_implementation_mode(implementation: str, bks) -> str:
    """Fail early, with the reason, when the fused kernel cannot run on its backend's device;
    otherwise say how it runs (compiled, or interpreted)."""
    backend = IMPLEMENTATION_BACKEND[implementation]
    adapter = next((b for b in bks if b.name == backend), None)
    if adapter is None:
        raise UsageError(f"--implementation {implementation}: the {backend} backend could not be imported")
    if implementation == "pallas":
        if adapter.interpreted():
            return "run in Pallas' interpret mode: no GPU, slow"
        return "compiled for the GPU"
    from ftattn_torch import fused

    if adapter.device.type == "cuda" and fused.interpreting():
        raise UsageError("--implementation triton: TRITON_INTERPRET=1 is set but a GPU is present; unset it to "
                         "compile the kernels for the GPU")
    if adapter.device.type != "cuda" and not fused.interpreting():
        raise UsageError("--implementation triton: no GPU, and Triton's kernels were imported before "
                         "TRITON_INTERPRET=1 could be set; run in a fresh process, or export TRITON_INTERPRET=1")
    if adapter.device.type == "cuda":
        return "compiled for the GPU"
    return "run in Triton's interpreter: no GPU, TRITON_INTERPRET=1, slow"


def implementation_header(implementation: str, bks, scheme: str, dtypes, dropped) -> str:
    """The campaign's first line under a fused ``--implementation``: what each backend runs, how, and
    the dtypes left out. Fails early (:func:`check_implementation_mode`) when the kernel cannot run."""
    mode = check_implementation_mode(implementation, bks)
    what = {implementation: f" ({mode}; checks {', '.join(implementation_checks(implementation, scheme))}; "
                            f"no localization)"}
    impls = ", ".join(f"{b.name} {b.implementation}{what.get(b.implementation, '')}" for b in bks)
    left_out = (f" ({','.join(dropped)} left out: {implementation} takes float16 and bfloat16 only)"
                if dropped else "")
    return f"# implementations: {impls}; dtypes {','.join(dtypes)}{left_out}"
