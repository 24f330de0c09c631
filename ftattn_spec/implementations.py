"""The implementation catalogue: what each implementation of each backend can run.

One frozen record per implementation answers every "can it run this" question
(checks, dtypes, head dims, mask forms, devices, lowerings, localization);
:func:`unsupported` turns a call into a reason, or None. The backends'
dispatchers, ``compare`` and the README's support table read this module, and
nothing else keeps such a table.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

from .policy import caller_stacklevel
from .schemes import CHECKS, SCHEMES

#: The mask forms of ``ftattn_spec.masking``, as the catalogue names them.
MASK_FORMS: tuple[str, ...] = ("causal", "mask", "bias", "lengths", "window")


@dataclass(frozen=True)
class Lowering:
    """One kernel behind an implementation (``implementation="pallas"`` has two); ``"auto"``
    takes the first that runs the call."""

    name: str
    head_dims: tuple[int, ...]
    devices: tuple[str, ...]
    summary: str
    mask_forms: tuple[str, ...] = MASK_FORMS


@dataclass(frozen=True)
class Implementation:
    """What one implementation of one backend runs.

    ``head_dims`` None means any head dim; ``devices`` are platform names
    (``"cpu"``, ``"gpu"``), with ``interpreted`` the ones where a fused kernel
    runs in its framework's interpreter (slowly: for tests and fault
    experiments). ``localizes``: with ``full`` at vector granularity it
    locates (and under ``on_fault="correct"`` repairs) a single bad element of
    S or O; the fused kernels recompute flagged rows instead.
    """

    backend: str
    name: str
    summary: str
    checks: tuple[str, ...]
    dtypes: tuple[str, ...]
    head_dims: tuple[int, ...] | None
    mask_forms: tuple[str, ...]
    devices: tuple[str, ...]
    interpreted: tuple[str, ...] = ()
    lowerings: tuple[Lowering, ...] = ()
    localizes: bool = False
    aliases: tuple[str, ...] = ()

    def __post_init__(self):
        if not set(self.checks) <= set(CHECKS):
            raise ValueError(f"{self.checks=} must be among {CHECKS}")
        if not set(self.mask_forms) <= set(MASK_FORMS):
            raise ValueError(f"{self.mask_forms=} must be among {MASK_FORMS}")

    @property
    def fused(self) -> bool:
        return self.name != "unfused"


_ALL_DTYPES = ("float16", "bfloat16", "float32", "float64")
_FUSED_DTYPES = ("float16", "bfloat16")
_FUSED_HEAD_DIMS = (16, 32, 64, 128)  # Triton needs powers of two, the tensor cores at least 16
# The fused kernels check rows only: a column checksum needs a sum over every
# query block, a reduction across programs that costs more than it adds
# (docs/kernels.md), so their ``full`` runs these three and locates nothing.
_ROW_CHECKS = ("qk_row", "softmax_dmr", "softmax_exp", "pv_row")

CATALOGUE: tuple[Implementation, ...] = (
    Implementation("jax", "unfused", "the schemes in jit-compiled JAX (XLA)", CHECKS, _ALL_DTYPES, None,
                   MASK_FORMS, ("cpu", "gpu"), localizes=True, aliases=("xla",)),
    Implementation("jax", "pallas", "one fused flash-attention kernel in Pallas with the checks inside",
                   _ROW_CHECKS, _FUSED_DTYPES, _FUSED_HEAD_DIMS, MASK_FORMS, ("gpu",), interpreted=("cpu",),
                   lowerings=(Lowering("triton", _FUSED_HEAD_DIMS, ("gpu",), "portable: Pallas' Triton lowering"),
                              Lowering("mosaic_gpu", (64, 128), ("sm_90",),
                                       "Hopper: Mosaic GPU, TMA, warpgroup MMAs, warp specialization",
                                       ("causal",)))),
    Implementation("torch", "unfused", "the schemes in eager PyTorch", CHECKS, _ALL_DTYPES, None, MASK_FORMS,
                   ("cpu", "cuda"), localizes=True),
    Implementation("torch", "triton", "one fused flash-attention kernel in Triton with the checks inside",
                   _ROW_CHECKS, _FUSED_DTYPES, _FUSED_HEAD_DIMS, MASK_FORMS, ("cuda",), interpreted=("cpu",)),
)

BACKENDS: tuple[str, ...] = ("jax", "torch")


def implementations(backend: str) -> tuple[Implementation, ...]:
    """The backend's implementations (the default, ``"auto"``, chooses among them: :func:`choose`)."""
    return tuple(i for i in CATALOGUE if i.backend == backend)


def accepted_names(backend: str) -> tuple[str, ...]:
    """Every string ``implementation=`` takes in ``backend`` (names and aliases)."""
    out: list[str] = []
    for i in implementations(backend):
        out += [i.name, *i.aliases]
    return tuple(out)


def lookup(backend: str, name: str) -> Implementation:
    """The record of ``name`` (or an alias) in ``backend``; ``KeyError`` if there is none."""
    for i in implementations(backend):
        if name == i.name or name in i.aliases:
            return i
    raise KeyError((backend, name))


def record(name: str) -> Implementation:
    """The record of an implementation name (names are unique across backends, except ``unfused``)."""
    return next(i for i in CATALOGUE if i.name == name or name in i.aliases)


#: What ``implementation=None`` means in every entry point: the fused kernel where it fits, else unfused.
AUTO = "auto"


def resolve(backend: str, implementation) -> str:
    """``implementation`` as a canonical name, ``"auto"`` for None or ``"auto"``, or an error naming it."""
    if implementation is None or implementation == AUTO:
        return AUTO
    allowed = (AUTO, *accepted_names(backend))
    if not isinstance(implementation, str):
        raise TypeError(f"implementation: expected a str, one of {allowed}, got "
                        f"{type(implementation).__name__} {implementation!r}")
    if implementation not in allowed:
        raise ValueError(f"implementation: expected one of {allowed}, got {implementation!r}")
    return lookup(backend, implementation).name


def fused_record(backend: str) -> Implementation:
    """The backend's fused implementation."""
    return next(i for i in implementations(backend) if i.fused)


def choose(backend: str, *, device_reason: str | None, scheme: str, dtype: str, q_shape,
           masking=()) -> tuple[str, str | None]:
    """What ``implementation="auto"`` runs: ``(name, fallback reason or None)``.

    The fused kernel when the device can run it (``device_reason`` None: the
    backend judges its runtime) and :func:`unsupported` finds nothing against
    the arguments; otherwise ``"unfused"`` with the reason.
    """
    fused = fused_record(backend)
    if device_reason is not None:
        return "unfused", device_reason
    refusal = unsupported(backend, fused.name, scheme=scheme, dtype=dtype, q_shape=q_shape, masking=masking)
    if refusal is not None:
        return "unfused", refusal.message
    return fused.name, None


def select(backend: str, implementation: str, *, device_reason: str | None, scheme: str, dtype: str, q_shape,
           masking=()) -> tuple[str, str | None]:
    """What a call runs, ``(name, why "auto" fell back or None)``: ``implementation`` (a name from
    :func:`resolve`) as :func:`choose` decides for ``"auto"``, else the name itself, or the error
    :func:`unsupported` gives against the arguments. The device of a named implementation stays the
    backend's to judge."""
    if implementation == AUTO:
        return choose(backend, device_reason=device_reason, scheme=scheme, dtype=dtype, q_shape=q_shape,
                      masking=masking)
    refusal = unsupported(backend, implementation, scheme=scheme, dtype=dtype, q_shape=q_shape, masking=masking)
    if refusal is not None:
        raise refusal.exception()
    return implementation, None


class FallbackWarning(UserWarning):
    """``implementation="auto"`` ran the unfused path on a GPU, where the fused kernel would be
    much faster; the message says why."""


_WARNED: set[tuple[str, str]] = set()


def warn_fallback(backend: str, reason: str) -> None:
    """Warn once per reason (per process) that ``"auto"`` fell back on a GPU, at the user's call."""
    if (backend, reason) in _WARNED:
        return
    _WARNED.add((backend, reason))
    warnings.warn(f"ftattn ({backend}): implementation='auto' ran the unfused path (much slower than the fused "
                  f"kernel) because: {reason}", FallbackWarning, stacklevel=caller_stacklevel())


def warn_lowering(backend: str, reason: str) -> None:
    """Warn once per reason (per process) that ``implementation="pallas"`` with ``lowering="auto"``
    ran the portable kernel on a GPU where the Hopper kernel runs, because of the call's arguments."""
    if (backend, "lowering: " + reason) in _WARNED:
        return
    _WARNED.add((backend, "lowering: " + reason))
    warnings.warn(f"ftattn ({backend}): the portable Pallas kernel ran, not the faster Hopper kernel, because: "
                  f"{reason}", FallbackWarning, stacklevel=caller_stacklevel())


def run_checks(implementation: str, scheme: str) -> tuple[str, ...]:
    """The checks ``scheme`` runs under ``implementation``, in ``CHECKS`` order.

    A scheme whose checks the implementation runs none of (``abft_qk_col`` on
    a fused kernel) is an error, not a silent baseline.
    """
    runs = record(implementation).checks
    wanted = SCHEMES[scheme].checks
    out = tuple(c for c in wanted if c in runs)
    if wanted and not out:
        raise ValueError(f"scheme: implementation={implementation!r} runs only the checks {runs}, none of which "
                         f"scheme {scheme!r} has ({', '.join(wanted)}); use implementation='unfused' for it")
    return out


def checks_for(backend: str, implementation: str, scheme: str) -> tuple[str, ...]:
    """The checks of ``scheme`` that ``implementation`` runs (none: see :func:`unsupported`)."""
    runs = lookup(backend, implementation).checks
    return tuple(c for c in SCHEMES[scheme].checks if c in runs)


def localizes(implementation: str, scheme: str, granularity: str) -> bool:
    """Whether the report's ``located`` holds entries: at vector granularity, in an implementation
    that locates, for a scheme with both checks of a GEMM (``full``, ``abft_all``)."""
    checks = set(SCHEMES[scheme].checks)
    pair = {"qk_row", "qk_col"} <= checks or {"pv_row", "pv_col"} <= checks
    return record(implementation).localizes and pair and granularity == "vector"


class Refusal(NamedTuple):
    """Why an implementation cannot run a call: the argument at fault, the sentence, the error type."""

    argument: str
    message: str
    error: type

    def exception(self) -> Exception:
        return self.error(self.message)


def unsupported(backend: str, implementation: str, *, scheme: str, dtype: str, q_shape,
                masking=()) -> Refusal | None:
    """Why ``implementation`` cannot run the call, or None when the catalogue says it can.

    ``masking`` holds ``(name, value)`` pairs (or a dict) of the mask arguments in the
    order mask, bias, query lengths, key lengths, window, named as the caller spells
    them (two may share a name), None where not given; ``is_causal`` is every record's. The
    device is the backend's to judge (it knows the runtime: an interpreter,
    a compiler); this answers for the arguments.
    """
    rec = lookup(backend, implementation)
    name = rec.name
    try:
        run_checks(name, scheme)
    except ValueError as e:
        return Refusal("scheme", str(e), ValueError)
    if dtype not in rec.dtypes:
        return Refusal("query", f"query: implementation={name!r} expected {' or '.join(rec.dtypes)}, got {dtype} "
                                f"(use implementation='unfused' for float32 and float64)", TypeError)
    H = int(q_shape[-1])
    if rec.head_dims is not None and H not in rec.head_dims:
        return Refusal("query", f"query: implementation={name!r} expected head dim H in {rec.head_dims}, got H={H} "
                                f"(shape {tuple(q_shape)}; use implementation='unfused')", ValueError)
    pairs = list(masking.items() if isinstance(masking, dict) else masking)
    for (arg, x), form in zip(pairs, _ARGUMENT_FORMS):
        if x is not None and form not in rec.mask_forms:
            return Refusal(arg, f"{arg}: implementation={name!r} supports the mask forms {rec.mask_forms}, not "
                                f"{form} (use implementation='unfused')", ValueError)
    return None


#: the mask form of each mask argument, in the order every entry point passes them to
#: :func:`unsupported` (mask, bias, query lengths, key lengths, window)
_ARGUMENT_FORMS = ("mask", "bias", "lengths", "lengths", "window")


def support_table() -> str:
    """The README's "what runs where" table, in Markdown, generated from the catalogue."""
    rows = ["| backend | `implementation=` | checks | dtypes | head dims | masks | devices | locates | kernels |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i in CATALOGUE:
        names = " / ".join(f"`{n}`" for n in (i.name, *i.aliases))
        heads = "any" if i.head_dims is None else ", ".join(map(str, i.head_dims))
        devices = ", ".join(i.devices) + "".join(f", {d} (interpreted)" for d in i.interpreted)
        kernels = "; ".join(f"`{lo.name}` ({lo.summary}; H in {', '.join(map(str, lo.head_dims))}; "
                            f"{', '.join(lo.devices)}"
                            + ("" if lo.mask_forms == MASK_FORMS else f"; masks: {', '.join(lo.mask_forms)}") + ")"
                            for lo in i.lowerings) or "-"
        rows.append(f"| {i.backend} | {names} | {', '.join(i.checks)} | {', '.join(i.dtypes)} | {heads} | "
                    f"{', '.join(i.mask_forms)} | {devices} | {'yes' if i.localizes else 'no'} | {kernels} |")
    return "\n".join(rows)
