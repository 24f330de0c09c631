"""The PyTorch backend's one dispatcher, and its public entry point ``attention``.

:func:`resolve` validates a call into a :class:`Call` (implementation and the
checks it runs: decided once); :func:`execute` runs it, with the one ``match``
that knows which implementation runs. The drop-ins (``sdpa``, ``module``)
translate their arguments and call these two.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Sequence

import torch

from ftattn_spec import faults as spec_faults
from ftattn_spec import implementations, masking, policy
from ftattn_spec import validation as v
from ftattn_spec.axes import LAYOUTS
from ftattn_spec.faults import Fault, FaultDetected
from ftattn_spec.report import Ran, Report, with_ran

from . import counters, dtensor, fused, unfused

_LAYOUT_Q, _LAYOUT_KV = LAYOUTS["torch"]


def _as_tensor(name: str, x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    raise TypeError(f"{name}: expected a torch.Tensor of layout "
                    f"{_LAYOUT_Q if name == 'query' else _LAYOUT_KV}, got {type(x).__name__}")


def _dtype_name(x: torch.Tensor) -> tuple[str, bool]:
    return str(x.dtype).removeprefix("torch."), x.dtype.is_floating_point


def _optional(name: str, x):
    if x is None or isinstance(x, torch.Tensor):
        return x
    raise TypeError(f"{name}: expected None or a torch.Tensor, got {type(x).__name__}")


_NAMES = ("mask", "bias", "query_seq_lengths", "key_value_seq_lengths", "local_window_size")


def _spec(x):
    return None if x is None else (tuple(x.shape), str(x.dtype).removeprefix("torch."))


class Call(NamedTuple):
    """One call, resolved once: the validated settings (implementation and the checks it runs
    included) and the mask forms."""

    settings: v.Settings
    masking: masking.Masking
    #: why ``implementation="auto"`` did not take the fused kernel (None: it did, or was not asked to choose)
    fallback: str | None = None


def resolve(query, key, value, *, bias=None, mask=None, scheme="full", granularity="vector", scale=None,
            is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
            on_fault="report", fault=None, implementation=None, names=_NAMES) -> Call:
    """Validate every argument of a call into a :class:`Call`, or raise naming the argument.

    ``names`` are the names of the mask arguments in errors (the SDPA drop-in
    passes its own).
    """
    impl = implementations.resolve("torch", implementation)
    query, key, value = (_as_tensor(n, x) for n, x in (("query", query), ("key", key), ("value", value)))
    for n, x in zip(names, (mask, bias, query_seq_lengths, key_value_seq_lengths)):
        _optional(n, x)
    cfg = v.validate_attention("torch", (query.shape, key.shape, value.shape),
                               [_dtype_name(x) for x in (query, key, value)],
                               scheme=scheme, granularity=granularity, scale=scale, is_causal=is_causal,
                               on_fault=on_fault, fault=fault,
                               implementation="unfused" if impl == implementations.AUTO else impl)
    if not (query.device == key.device == value.device):
        raise ValueError(f"query, key, value: expected one device for all three, got query {query.device}, "
                         f"key {key.device}, value {value.device}")
    m = masking.validate_masking(cfg.dims, mask=_spec(mask), bias=_spec(bias), query_lengths=_spec(query_seq_lengths),
                                 key_lengths=_spec(key_value_seq_lengths), window=local_window_size, names=names)
    for n, x in zip(names, (mask, bias, query_seq_lengths, key_value_seq_lengths)):
        if x is not None and x.device != query.device:
            raise ValueError(f"{n}: expected the device of query ({query.device}), got {x.device}")
    given = list(zip(names, (mask, bias, query_seq_lengths, key_value_seq_lengths, local_window_size)))
    if impl == implementations.AUTO:
        impl, fallback = _choose(_device_reason(query.device.type), cfg.scheme, cfg.dtype,
                                 tuple(int(n) for n in query.shape), tuple((n, x is not None) for n, x in given))
        if fallback is not None and query.device.type == "cuda" and not torch.compiler.is_compiling():
            implementations.warn_fallback("torch", fallback)
        cfg = cfg._replace(implementation=impl, checks=implementations.checks_for("torch", impl, cfg.scheme))
        _backward_sites_need_triton(fault, impl)
        return Call(cfg, m, fallback)
    implementations.select("torch", impl, device_reason=None, scheme=cfg.scheme, dtype=cfg.dtype,
                           q_shape=query.shape, masking=given)  # a named implementation: raises what it cannot run
    if impl == "triton" and (why := fused.unsupported(query.device.type)) is not None:
        raise ValueError(why)
    _backward_sites_need_triton(fault, impl)
    return Call(cfg, m)


def _backward_sites_need_triton(fault, impl: str) -> None:
    for sites, what in ((spec_faults.BACKWARD_SITES, "backward"), (spec_faults.FUSED_FORWARD_SITES, "forward")):
        named = spec_faults.sites_of(fault, sites)
        if named and impl != "triton":
            raise ValueError(f"fault.site: {named[0]!r} is a site of the fused {what}, which only "
                             f"implementation='triton' has; this call runs {impl!r}")


def _constant_under_compile(fn):
    """``torch.compiler.assume_constant_result(fn)`` without importing ``torch._dynamo`` when
    ftattn is imported (it imports triton): that decorator only sets this attribute."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile
def _choose(device_reason, scheme: str, dtype: str, q_shape: tuple, given: tuple) -> tuple[str, str | None]:
    """``implementations.choose`` on plain values: ``torch.compile`` calls it once, eagerly, and
    keeps the answer as a constant of the graph (it cannot trace the catalogue's records)."""
    return implementations.choose("torch", device_reason=device_reason, scheme=scheme, dtype=dtype,
                                  q_shape=q_shape, masking=[(n, True if g else None) for n, g in given])


@_constant_under_compile
def _device_reason(device_type: str) -> str | None:
    """``fused.auto_reason``, a constant of the graph under ``torch.compile``."""
    return fused.auto_reason(device_type)


def execute(query, key, value, *, implementation: str, checks: tuple[str, ...], granularity: str, scale: float,
            is_causal: bool, on_fault: str, plan=None, mask=None, bias=None, query_lengths=None, key_lengths=None,
            window=None, empty: str = "zero", fallback: str | None = None, site: str | None = None,
            warn: bool = False, lse_out=None):
    """Run validated arguments: the only place that knows which implementation runs, and the only
    place that applies ``on_fault="raise"`` (the implementations apply ``"correct"`` and ``"nan"``).

    The fused backward's verdict comes back through :func:`_backward_hook`: counted under
    ``site`` + ``" (backward)"``, and raised, or warned about, as ``on_fault`` and ``warn`` say."""
    common = dict(checks=checks, granularity=granularity, scale=scale, is_causal=is_causal,
                  on_fault="report" if on_fault == "raise" else on_fault, plan=plan)
    match implementation:
        case "triton":
            out, report = fused.run(query, key, value, bias=bias, mask=mask, query_lengths=query_lengths,
                                    key_lengths=key_lengths, window=window,
                                    backward_hook=_backward_hook(site, on_fault, warn), lse_out=lse_out, **common)
        case "unfused":
            out, report = unfused.run(query, key, value, bias=bias, mask=mask, query_lengths=query_lengths,
                                      key_lengths=key_lengths, window=window, empty=empty, **common)
        case other:  # pragma: no cover - the catalogue and this match disagree
            raise NotImplementedError(f"implementation: {other!r} is in the catalogue but not dispatched")
    report = with_ran(report, Ran(implementation, fallback))
    if on_fault == "raise" and bool(report.detected):
        raise FaultDetected(report)
    return out, report


def execute_backward(implementation: str, query, key, value, out, lse, grad_out, *, mask, bias, is_causal: bool,
                     scale: float, checks: bool, on_fault: str, plan=None, bias_grad: bool = False):
    """The backward of a call that ``execute`` ran without autograd (the SDPA custom operator's):
    ``(dq, dk, dv, dbias)``. Only ``"triton"`` has a backward of its own (fused and checked, from
    the forward's log-sum-exp ``lse``); it applies ``on_fault`` here, ``"raise"`` included."""
    match implementation:
        case "triton":
            blocks = fused.BlockSizes.get_default(fused.interpreting(), checks, query.shape[2],
                                                  dense=mask is not None or bias is not None)
            st = fused.Backward(scale, fused.Masks(mask, bias, is_causal=is_causal), checks, plan,
                                "report" if on_fault == "raise" else on_fault, blocks.block_n)
            dq, dk, dv, dbias, report = fused.checked_backward(query, key, value, bias, out, lse, grad_out, st,
                                                               bias_grad)
        case other:  # pragma: no cover - only the kernel keeps a log-sum-exp
            raise NotImplementedError(f"implementation: {other!r} has no backward of its own")
    if report is not None and on_fault == "raise" and bool(report.detected):
        raise FaultDetected(report)
    return dq, dk, dv, dbias


def _backward_hook(site: str | None, on_fault: str, warn: bool):
    """What the fused backward does with its report: count it, then raise or warn as asked."""
    name = f"{site or 'unnamed'} (backward)"

    def hook(report: Report) -> None:
        count(name, report, warn)
        if on_fault == "raise" and not torch.compiler.is_compiling() and bool(report.detected):
            raise FaultDetected(report)

    return hook


def attention(query, key, value, *, bias=None, mask=None, scheme: str = "full", granularity: str = "vector",
              scale: float | None = None, is_causal: bool = False, query_seq_lengths=None,
              key_value_seq_lengths=None, local_window_size: int | tuple[int, int] | None = None,
              on_fault: str = "report", fault: Fault | Sequence[Fault] | None = None,
              implementation: str | None = None, site: str | int | None = None) -> tuple[torch.Tensor, Report]:
    """Fault-checked attention in ``scaled_dot_product_attention``'s layout.

    Args:
      query: ``(B, N, T, H)`` float16, bfloat16 or float32.
      key, value: ``(B, K, S, H)``, same dtype and device; ``K`` divides ``N``
        (grouped-query attention when ``K < N``; query head ``n`` reads kv head
        ``n // (N // K)``).
      bias: added to the logits ``scale·QKᵀ`` before the softmax; broadcastable
        to ``(B, N, T, S)``.
      mask: bool, True where query ``i`` may attend key ``j``; broadcastable to
        ``(B, N, T, S)``. Masked entries are left out of the checksums.
      scheme: one of ``ftattn_spec.SCHEME_NAMES``.
      granularity: ``"vector"`` (one verdict per row or column) or ``"global"``
        (one per batch and head).
      scale: logit scale, default ``H ** -0.5``.
      is_causal: upper-left-aligned causal mask (query ``i`` attends keys ``j <= i``).
      query_seq_lengths, key_value_seq_lengths: integer ``(B,)``; rows and keys
        at or beyond the length are masked.
      local_window_size: ``(left, right)`` or an int: query ``i`` attends keys
        ``i - left <= j <= i + right``.
      on_fault: what a detected fault does. ``"report"``: nothing beyond the
        report. ``"correct"``: repair located single elements of S or O,
        recompute the affected rows, and let a third softmax vote on a DMR
        mismatch. ``"nan"``: set the affected output rows to NaN. ``"raise"``:
        raise ``FaultDetected`` (``.report`` holds the report).
      fault: a ``ftattn_spec.Fault`` or a sequence of them to inject
        (reproducible fault experiments).
      implementation: ``None`` or ``"auto"`` (the default): ``"triton"`` for CUDA
        tensors when triton is installed and the catalogue
        (``ftattn_spec.implementations``) says the kernel takes the call, else
        ``"unfused"``; ``report.ran`` says which ran and, after a fallback, why
        (a fallback on a GPU also warns, once per reason: ``FallbackWarning``).
        ``"unfused"``: the schemes in eager PyTorch. ``"triton"``: one fused flash-attention kernel with the
        checks inside (float16/bfloat16, H in 16, 32, 64, 128, every mask
        form); its ``full`` runs the row checks ``qk_row``,
        ``softmax_dmr`` and ``pv_row`` and locates nothing, and
        ``on_fault="correct"`` recomputes the flagged query blocks. It needs
        CUDA tensors, or ``TRITON_INTERPRET=1`` (set before triton is
        imported) to run in Triton's interpreter on the CPU.
      site: the name this call is counted under in ``ftattn_torch.counters``
        (an int is a layer index); default the caller's file and line.

    Returns:
      ``(out, report)``: ``out`` is ``(B, N, T, H)`` in the input dtype; ``report``
      is a ``ftattn_spec.Report`` of tensors on the input's device. With
      ``on_fault="report"`` or ``"nan"`` nothing waits for the device;
      ``"correct"`` and ``"raise"`` read the flags on the host. A row with no
      attended key has output zero.

    Autograd flows through ``out`` as through plain attention (the checks are
    computed without a graph, and the backward pass itself is not checked; with
    ``"triton"`` it is the fused backward kernel, whose memory is O(B·N·T)).
    """
    site = call_site(site)
    if dtensor.any_dtensor(query, key, value):  # a call over a device mesh: each rank its block
        def local(q, k, v, fault, **extras):
            return attention(q, k, v, scheme=scheme, granularity=granularity, scale=scale, is_causal=is_causal,
                             local_window_size=local_window_size, fault=fault, implementation=implementation,
                             on_fault="report" if on_fault == "raise" else on_fault, site=site, **extras)
        return dtensor.run(local, query, key, value, fault=fault, raise_on_fault=on_fault == "raise",
                           extras=dict(mask=mask, bias=bias, query_seq_lengths=query_seq_lengths,
                                       key_value_seq_lengths=key_value_seq_lengths))
    call = resolve(query, key, value, bias=bias, mask=mask, scheme=scheme, granularity=granularity, scale=scale,
                   is_causal=is_causal, query_seq_lengths=query_seq_lengths,
                   key_value_seq_lengths=key_value_seq_lengths, local_window_size=local_window_size,
                   on_fault=on_fault, fault=fault, implementation=implementation)
    cfg = call.settings
    out, report = execute(query, key, value, implementation=cfg.implementation, checks=cfg.checks,
                          granularity=cfg.granularity, scale=cfg.scale, is_causal=cfg.is_causal,
                          on_fault=cfg.on_fault, plan=cfg.plan, mask=mask, bias=bias, query_lengths=query_seq_lengths,
                          key_lengths=key_value_seq_lengths, window=call.masking.window, fallback=call.fallback,
                          site=site)
    count(site, report)
    return out, report


def call_site(site) -> str:
    """The counters' key: ``site`` validated, else the caller's file and line (``"compiled"`` while
    ``torch.compile`` traces: it cannot read the Python stack, and the counters skip traced calls)."""
    site = policy.validate_site(site)
    if site is not None:
        return site
    return "compiled" if torch.compiler.is_compiling() else policy.caller_site()


def count(site: str, report: Report, warn: bool = False) -> None:
    """Add the call to ``ftattn_torch.counters``; under the policy ``"warn"``, warn on a detection
    (which reads the verdict on the host)."""
    counters.record(site, report)
    if warn and not torch.compiler.is_compiling() and bool(report.detected):
        warnings.warn(f"ftattn (torch): a fault was detected in attention at {site} (nobody reads this call's "
                      f"report; policy 'warn')", policy.FaultWarning, stacklevel=policy.caller_stacklevel())
