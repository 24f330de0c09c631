"""``scaled_dot_product_attention``: a drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

The computation is one custom operator, ``ftattn::sdpa``
(``torch.library.custom_op``), with a fake implementation (shapes only), so
``torch.compile(fullgraph=True)`` traces through it as one opaque node, and an
autograd formula (the backward of plain attention, in float32; with the Triton
kernel its fused, checked backward, the operator ``ftattn::sdpa_backward``, from
the log-sum-exp the forward operator also returns), so ``torch.library.opcheck``
passes. The operator returns the output and the
report as a flat list of tensors; :func:`scaled_dot_product_attention` turns
the list back into a ``Report``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ftattn_spec import faults as spec_faults
from ftattn_spec import implementations, policy
from ftattn_spec import validation as v
from ftattn_spec.axes import REPORT_AXES
from ftattn_spec.faults import Fault, FaultPlan
from ftattn_spec.report import CheckResult, Ran, Report, with_ran
from ftattn_spec.schemes import CHECK_ORIENTATION

from . import dtensor, reference, sdpa_shapes
from .api import call_site, count, execute, execute_backward, resolve

_NAMES = ("attn_mask", "attn_mask", "query_seq_lengths", "key_value_seq_lengths", "local_window_size")
_BOOL, _I32, _F32 = torch.bool, torch.int32, torch.float32


def _report_sizes(dims: dict, granularity: str, orientation: str) -> tuple[int, ...]:
    return tuple(dims[a] for a in REPORT_AXES[(granularity, orientation)])


def _flatten(out: Tensor, report: Report) -> list[Tensor]:
    flat = [out, report.detected, report.inputs_finite, report.corrected]
    for c in report.checks.values():
        flat += [c.residual, c.threshold, c.flagged]
    flat += [report.located[k] for k in ("scores", "out") if k in report.located]
    return flat


def _unflatten(flat: Sequence[Tensor], scheme: str, granularity: str,
               implementation: str = "unfused") -> tuple[Tensor, Report]:
    out, detected, finite, corrected = flat[:4]
    names = implementations.checks_for("torch", implementation, scheme)
    checks = {n: CheckResult(*flat[4 + 3 * i: 7 + 3 * i]) for i, n in enumerate(names)}
    rest = flat[4 + 3 * len(names):]
    has_located = implementations.localizes(implementation, scheme, granularity)
    located = dict(zip(("scores", "out"), rest)) if has_located else {}
    return out, Report(detected=detected, checks=checks, inputs_finite=finite, located=located, corrected=corrected)


def _plan_tensors(plan: FaultPlan | None) -> tuple[Tensor | None, Tensor | None]:
    """A ``FaultPlan`` as two CPU tensors: int64 ``(F, 8)`` rows (``ftattn_spec.faults.FAULT_ROW``)
    and float64 ``(F,)`` values."""
    if plan is None:
        return None, None
    ints, values = spec_faults.pack_rows(plan)
    return torch.from_numpy(ints.astype(np.int64)), torch.from_numpy(np.asarray(values, np.float64))


def _plan(ints: Tensor | None, values: Tensor | None) -> FaultPlan | None:
    if ints is None:
        return None
    return spec_faults.unpack_rows(ints.cpu().numpy(), values.cpu().numpy())


@torch.library.custom_op("ftattn::sdpa", mutates_args=())
def _sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], is_causal: bool, scale: float,
          scheme: str, granularity: str, on_fault: str, fault_ints: Optional[Tensor],
          fault_values: Optional[Tensor], implementation: str = "unfused") -> list[Tensor]:
    mask, bias = reference.split_mask(attn_mask)
    fused = implementation == "triton"  # the kernel keeps the rows' log-sum-exp for its own backward
    lse = query.new_empty(query.shape[:3], dtype=_F32) if fused else None
    out, report = execute(query, key, value, implementation=implementation,
                          checks=implementations.checks_for("torch", implementation, scheme), granularity=granularity,
                          scale=scale, is_causal=is_causal, on_fault=on_fault, plan=_plan(fault_ints, fault_values),
                          mask=mask, bias=bias, lse_out=lse)
    flat = _flatten(out.contiguous(), report)
    if implementation != "unfused":  # a kernel's report tensors are views of a few buffers: copy them
        flat = flat[:1] + [t.clone() for t in flat[1:]]
    return flat + ([lse] if fused else [])  # fresh tensors: nothing aliases an input


@_sdpa.register_fake
def _sdpa_fake(query, key, value, attn_mask, is_causal, scale, scheme, granularity, on_fault, fault_ints,
               fault_values, implementation="unfused"):
    B, N, T, H = query.shape
    dims = {"B": B, "N": N, "T": T, "S": key.shape[2], "H": H}
    new = query.new_empty
    # the output is contiguous whatever the query's strides (a transposed view, as attention
    # modules pass it): the real op makes it so, and the fake must say the same
    flat = [new(query.shape), new((), dtype=_BOOL), new((), dtype=_BOOL), new((), dtype=_I32)]
    for name in implementations.checks_for("torch", implementation, scheme):
        size = _report_sizes(dims, granularity, CHECK_ORIENTATION[name])
        flat += [new(size, dtype=_F32), new(size, dtype=_F32), new(size, dtype=_BOOL)]
    if implementations.localizes(implementation, scheme, granularity):
        flat += [new((B, N, 2), dtype=_I32), new((B, N, 2), dtype=_I32)]
    if implementation == "triton":
        flat.append(new((B, N, T), dtype=_F32))  # the log-sum-exp
    return flat


def _setup_context(ctx, inputs, output):
    query, key, value, attn_mask, is_causal, scale, scheme, _, on_fault, fault_ints, fault_values = inputs[:11]
    implementation = inputs[11] if len(inputs) > 11 else "unfused"
    fused = implementation == "triton"
    ctx.save_for_backward(query, key, value, attn_mask, output[0] if fused else None, output[-1] if fused else None,
                          fault_ints, fault_values)
    ctx.mark_non_differentiable(*output[1:])  # the report (and the log-sum-exp)
    ctx.is_causal, ctx.scale, ctx.fused, ctx.on_fault = is_causal, scale, fused, on_fault
    ctx.checks = bool(implementations.checks_for("torch", implementation, scheme))


def _backward(ctx, grads):
    query, key, value, attn_mask, out, lse, fault_ints, fault_values = ctx.saved_tensors
    if ctx.fused:  # the kernel's own backward, checked: one opaque operator for torch.compile too
        bias_grad = attn_mask is not None and attn_mask.dtype != torch.bool and ctx.needs_input_grad[3]
        dq, dk, dv, dmask = torch.ops.ftattn.sdpa_backward(
            query, key, value, attn_mask, out, lse, grads[0], ctx.is_causal, ctx.scale, ctx.checks, ctx.on_fault,
            fault_ints, fault_values, bias_grad)
        dmask = dmask if bias_grad else None
    else:
        dq, dk, dv, dmask = reference.attention_backward(query, key, value, attn_mask, ctx.is_causal, ctx.scale,
                                                         grads[0])
    # one gradient per argument as dispatched: the dispatcher drops a trailing
    # argument equal to its default (implementation="unfused")
    return (dq, dk, dv, dmask) + (None,) * (len(ctx.needs_input_grad) - 4)


@torch.library.custom_op("ftattn::sdpa_backward", mutates_args=())
def _sdpa_backward(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], out: Tensor,
                   lse: Tensor, grad_out: Tensor, is_causal: bool, scale: float, checks: bool, on_fault: str,
                   fault_ints: Optional[Tensor], fault_values: Optional[Tensor], bias_grad: bool) -> list[Tensor]:
    """The fused kernel's backward as one operator: ``[dq, dk, dv, dbias]`` (``dbias`` empty unless
    ``bias_grad``). ``on_fault`` applies inside it (``"raise"`` raises from the backward)."""
    mask, bias = reference.split_mask(attn_mask)
    dq, dk, dv, dbias = execute_backward("triton", query, key, value, out, lse, grad_out, mask=mask, bias=bias,
                                         is_causal=is_causal, scale=scale, checks=checks, on_fault=on_fault,
                                         plan=_plan(fault_ints, fault_values), bias_grad=bias_grad)
    return [dq, dk, dv, dbias if bias_grad else query.new_empty(0)]


@_sdpa_backward.register_fake
def _sdpa_backward_fake(query, key, value, attn_mask, out, lse, grad_out, is_causal, scale, checks, on_fault,
                        fault_ints, fault_values, bias_grad):
    return [query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape),
            attn_mask.new_empty(attn_mask.shape) if bias_grad else query.new_empty(0)]


_sdpa.register_autograd(_backward, setup_context=_setup_context)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: float | None = None, enable_gqa: bool = False, *, scheme: str = "full",
                                 granularity: str = "vector", on_fault: str = "report",
                                 fault: Fault | Sequence[Fault] | None = None, return_report: bool = False,
                                 implementation: str | None = None, site: str | int | None = None):
    """``torch.nn.functional.scaled_dot_product_attention`` with fault checks.

    The positional arguments have SDPA's meaning: query ``(B, N, T, H)``, key
    and value ``(B, K, S, H)`` (or all three without the batch axis; more
    leading axes are an error); ``attn_mask`` broadcastable to ``(B, N, T, S)``,
    bool (True = attend) or float (added to the logits); ``is_causal``
    (upper-left aligned; an error together with ``attn_mask``, as in SDPA);
    ``scale`` (default ``H ** -0.5``); ``enable_gqa`` lets ``K`` be a divisor of
    ``N`` (query head ``n`` reads kv head ``n // (N // K)``). A fully masked row
    gives zeros, as SDPA does. ``dropout_p`` must be 0.0: ftattn applies no
    dropout, and says so rather than ignore it.

    Keyword-only extras: ``scheme``, ``granularity``, ``on_fault``, ``fault``
    and ``implementation`` as in ``ftattn_torch.attention`` (``"triton"``: the
    fused kernel, without ``attn_mask``); ``return_report=True`` returns
    ``(out, report)``; ``site`` names the call in ``ftattn_torch.counters``
    (default: the caller's file and line). Without ``return_report`` the call
    is under ``ftattn_torch.fault_policy`` (what a detection does when nobody
    reads the report: count, warn, raise or poison).

    Traced (``torch.compile``, ``torch.func``, tensor subclasses) it runs as the
    custom operator ``torch.ops.ftattn.sdpa``, which works under
    ``torch.compile(fullgraph=True)``; eagerly on plain tensors it skips the
    operator's dispatch and runs the same implementation directly. Either way
    the backward is that of plain attention (not checked).
    """
    if not isinstance(return_report, bool):
        raise TypeError(f"return_report: expected a bool, got {type(return_report).__name__} {return_report!r}")
    out, report = sdpa_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, scheme=scheme,
                            granularity=granularity, on_fault=on_fault, fault=fault, takes_report=return_report,
                            implementation=implementation, site=site)
    return (out, report) if return_report else out


def _autocast(query, key, value):
    """Under ``torch.autocast``, SDPA runs in the autocast dtype (it is on autocast's list of
    lower-precision ops); a custom operator is not, so cast here, as autocast would."""
    if not isinstance(query, torch.Tensor) or not query.is_floating_point():
        return query, key, value
    device = query.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return query, key, value
    dtype = torch.get_autocast_dtype(device)
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                 for x in (query, key, value))


def _causal_bias(attn_mask, is_causal, query):
    """``torch.nn.attention.bias.CausalBias`` (``causal_upper_left``, ``causal_lower_right``) as SDPA
    reads it: upper left is ``is_causal``; lower right a boolean mask ``j <= i + S - T``."""
    from torch.nn.attention.bias import CausalBias, CausalVariant

    if not isinstance(attn_mask, CausalBias):
        return attn_mask, is_causal
    T, S = attn_mask.seq_len_q, attn_mask.seq_len_kv
    if query.shape[-2] != T:
        raise ValueError(f"attn_mask: a CausalBias for {T} queries, got a query of {query.shape[-2]} "
                         f"(shape {tuple(query.shape)})")
    if attn_mask.variant == CausalVariant.UPPER_LEFT or T == S:
        return None, True
    i = torch.arange(T, device=query.device)[:, None]
    j = torch.arange(S, device=query.device)[None, :]
    return j <= i + (S - T), False


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _eager(*tensors) -> bool:
    """Whether a call runs eagerly on plain tensors: not traced by ``torch.compile``, under no
    ``torch.func`` transform, and no tensor subclass (a fake, meta-functional or distributed
    tensor). Such calls skip the custom operator; every other call goes through it."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(x is None or type(x) in _PLAIN for x in tensors)


def sdpa_call(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
              scale: float | None = None, enable_gqa: bool = False, *, scheme: str = "full", granularity: str = "vector",
              on_fault: str = "report", fault=None, takes_report: bool = True, implementation: str | None = None,
              site=None):
    """:func:`scaled_dot_product_attention` returning ``(out, report)``; ``takes_report=False`` puts
    the call under the fault policy (``FaultTolerantAttention`` returns the output alone)."""
    v.validate_dropout(dropout_p)
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa: expected a bool, got {type(enable_gqa).__name__} {enable_gqa!r}")
    if dtensor.any_dtensor(query, key, value):  # a call over a device mesh: each rank its block
        site = call_site(site)
        run_on_fault, _ = policy.effective_on_fault(on_fault, takes_report)
        raising = run_on_fault == "raise"  # raised on every rank after the global verdict

        def local(q, k, v, fault, attn_mask):
            return sdpa_call(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, scheme=scheme,
                             granularity=granularity, on_fault="report" if raising else on_fault, fault=fault,
                             takes_report=takes_report or raising, implementation=implementation, site=site)
        return dtensor.run(local, query, key, value, fault=fault, raise_on_fault=raising,
                           extras=dict(attn_mask=attn_mask))
    if attn_mask is not None and is_causal is True:
        raise ValueError("attn_mask, is_causal: expected at most one of them, got both (as in "
                         "scaled_dot_product_attention; put the causal mask into attn_mask)")
    attn_mask, is_causal = _causal_bias(attn_mask, is_causal, query)
    query, key, value = _autocast(query, key, value)
    shaped = sdpa_shapes.canonical(query, key, value, attn_mask)  # (..., N, T, H) as (B, N, T, H)
    query, key, value, attn_mask = shaped.query, shaped.key, shaped.value, shaped.attn_mask
    mask, bias = reference.split_mask(attn_mask) if isinstance(attn_mask, torch.Tensor) else (attn_mask, None)
    site = call_site(site)
    if isinstance(query, torch.Tensor) and sdpa_shapes.has_zero_size(query, key, value):
        out, report = _zero_size(query, key, value, mask, bias, is_causal, scale, enable_gqa, scheme=scheme,
                                 granularity=granularity, on_fault=on_fault, fault=fault,
                                 implementation=implementation)
        count(site, report)
        return sdpa_shapes.restore(out, shaped), report
    call = resolve(query, key, value, bias=bias, mask=mask, scheme=scheme, granularity=granularity, scale=scale,
                   is_causal=is_causal, on_fault=on_fault, fault=fault, implementation=implementation, names=_NAMES)
    cfg = call.settings
    run_on_fault, warn = policy.effective_on_fault(cfg.on_fault, takes_report)
    impl = cfg.implementation
    if cfg.dims["K"] != cfg.dims["N"] and not enable_gqa and cfg.dims["K"] != 1:
        raise ValueError(f"key: expected N={cfg.dims['N']} kv heads (or enable_gqa=True for grouped-query "
                         f"attention), got K={cfg.dims['K']} (shape {tuple(key.shape)})")
    if _eager(query, key, value, attn_mask):
        # the custom operator's dispatch (and the copies its outputs need) is for tracing; eagerly,
        # the same ``execute`` runs directly, with the implementation's own autograd
        out, report = execute(query, key, value, implementation=impl, checks=cfg.checks,
                              granularity=cfg.granularity, scale=cfg.scale, is_causal=cfg.is_causal,
                              on_fault=run_on_fault, plan=cfg.plan, mask=mask, bias=bias, site=site, warn=warn)
        out = out.contiguous()
    else:
        ints, values = _plan_tensors(cfg.plan)
        flat = torch.ops.ftattn.sdpa(query, key, value, attn_mask, cfg.is_causal, cfg.scale, cfg.scheme,
                                     cfg.granularity, run_on_fault, ints, values, impl)
        if impl == "triton":  # the last output is the log-sum-exp, for the backward only
            flat = flat[:-1]
        out, report = _unflatten(flat, cfg.scheme, cfg.granularity, impl)
    report = with_ran(report, Ran(impl, call.fallback))
    count(site, report, warn)
    return sdpa_shapes.restore(out, shaped), report


def _zero_size(query, key, value, mask, bias, is_causal, scale, enable_gqa, *, scheme, granularity, on_fault,
               fault, implementation):
    """A call with an axis of size zero: every other argument validated as usual (on sizes of at
    least one), then computed by ``sdpa_shapes.degenerate``; nothing to check, and ``ran`` says so."""
    if fault is not None:
        raise ValueError(f"fault: expected None for inputs with a zero-size axis (query {tuple(query.shape)}, "
                         f"key {tuple(key.shape)}), where there is nothing to corrupt; got {fault!r}")
    if query.shape[3] != key.shape[3] or key.shape[:3] != value.shape[:3]:
        raise ValueError(f"key, value: expected key (B, K, S, H) with the query's B and H, and value (B, K, S, Hv), "
                         f"got query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}")
    ones = [tuple(max(int(n), 1) for n in x.shape) for x in (query, key, value)]
    ones[2] = ones[2][:3] + ones[1][3:]  # the value's head dim is free here (H = 0 averages values of any width)
    cfg = v.validate_attention("torch", ones, [(str(x.dtype).removeprefix("torch."), x.dtype.is_floating_point)
                                               for x in (query, key, value)],
                               scheme=scheme, granularity=granularity, scale=scale, is_causal=is_causal,
                               on_fault=on_fault, fault=fault, implementation="unfused")
    if cfg.dims["K"] != cfg.dims["N"] and not enable_gqa and cfg.dims["K"] != 1:
        raise ValueError(f"key: expected N={cfg.dims['N']} kv heads (or enable_gqa=True for grouped-query "
                         f"attention), got K={cfg.dims['K']} (shape {tuple(key.shape)})")
    impl = implementations.resolve("torch", implementation)
    if impl not in (implementations.AUTO, "unfused"):
        raise ValueError(f"implementation: {impl!r} cannot run inputs with a zero-size axis (query "
                         f"{tuple(query.shape)}, key {tuple(key.shape)}); use 'auto' or 'unfused'")
    out, report = sdpa_shapes.degenerate(query, key, value, mask, bias, is_causal, scale, scheme=cfg.scheme,
                                         granularity=cfg.granularity)
    why = (f"a zero-size axis (query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}): "
           f"computed as plain attention, with no products to check")
    return out, with_ran(report, Ran("unfused", why))
