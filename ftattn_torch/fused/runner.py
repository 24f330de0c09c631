"""``implementation="triton"``: run the fused, self-checking kernel of :mod:`.launch`.

``api`` validates a call and calls :func:`run`, which launches the pre-pass
and the forward kernel, turns the per-row statistics into the usual
``Report``, applies ``on_fault`` and gives autograd the fused, checked backward
(:func:`checked_backward`, with the same masks and bias).

The kernel checks rows only (``qk_row``, ``softmax_dmr``, ``softmax_exp``, ``pv_row``); a column
check would need a reduction across programs, so ``full`` runs ``qk_row``, ``softmax_dmr``, ``pv_row`` and ``abft_all``
``qk_row``, ``softmax_exp``, ``pv_row`` (the catalogue, ``ftattn_spec.implementations``), ``located`` is empty, and
``on_fault="correct"`` recomputes the flagged query blocks.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from ftattn_spec.faults import FaultPlan
from ftattn_spec.report import CheckResult, Report, make_report

from .. import faults
from ..common import reduce_to, verdict
from .launch import BACKWARD_GROUP_CHECKS, BACKWARD_KEY_CHECKS, BACKWARD_ROW_CHECKS, STAT_PLANES, BackwardLaunch, Masks, backward, forward


class Backward(NamedTuple):
    """How the fused backward of one call runs: its masks, whether it checks, the fault plan
    (its backward sites are injected), ``on_fault`` (``"nan"`` and ``"correct"`` apply here),
    and ``hook``, called with the backward's ``Report`` (the caller counts it and applies
    ``"raise"``)."""

    scale: float
    masks: Masks
    checks: bool
    plan: FaultPlan | None
    on_fault: str
    forward_block_n: int
    hook: Callable[[Report], None] | None = None


class _Attention(torch.autograd.Function):
    """The fused forward with the fused, checked backward (:func:`.launch.backward`: P recomputed
    tile by tile from the saved log-sum-exp; memory O(B·N·T) beyond the gradients)."""

    @staticmethod
    def forward(ctx, query, key, value, bias, out, lse, settings):
        m = settings.masks
        ctx.save_for_backward(query, key, value, bias, out, lse, m.mask, m.query_lengths, m.key_lengths)
        ctx.settings = settings
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, bias, out, lse, mask, qlen, klen = ctx.saved_tensors
        st: Backward = ctx.settings
        st = st._replace(masks=st.masks._replace(mask=mask, bias=None if bias is None else bias.detach(),
                                                 query_lengths=qlen, key_lengths=klen))
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias, report = checked_backward(query, key, value, bias, out, lse, grad_out, st, bias_grad)
        if report is not None and st.hook is not None:
            st.hook(report)
        return dq, dk, dv, dbias, None, None, None


def checked_backward(query, key, value, bias, out, lse, grad_out, st: Backward, bias_grad: bool):
    """The fused backward of one call with its checks and ``st.on_fault`` (``"nan"``: poison the
    implicated gradient rows; ``"correct"``: run it again without the plan's transient faults):
    ``(dq, dk, dv, dbias, report)``, the report None without checks."""
    q, k, v = query.detach(), key.detach(), value.detach()
    run = lambda plan: backward(q, k, v, out, lse, grad_out, scale=st.scale, masks=st.masks,  # noqa: E731
                                bias_grad=bias_grad, checks=st.checks, plan=plan,
                                forward_block_n=st.forward_block_n)
    got = run(st.plan)
    dq, dk, dv, ds = got.dq, got.dk, got.dv, got.ds
    report = None
    if st.checks:
        group = [verdict(r, t, "vector") for r, t in got.group]
        detected = got.count.any() | group[0].flagged.any()
        corrected = torch.zeros((), dtype=torch.int32, device=q.device)
        if st.on_fault == "correct" and bool(detected):  # recompute, without the (transient) faults
            again = run(None)
            dq, dk, dv, ds = again.dq, again.dk, again.dv, again.ds
            corrected += got.count.sum(dtype=torch.int32)
        if st.on_fault == "nan":  # poison the gradient rows the flagged checks implicate
            dq = dq.masked_fill(got.row_flags.any(0)[..., None], float("nan"))
            keys = got.key_flags.any(0)[..., None]
            dk, dv = dk.masked_fill(keys, float("nan")), dv.masked_fill(keys, float("nan"))
            heads = group[0].flagged[:, :, None, None]  # a whole head group's dK, dV
            dk, dv = dk.masked_fill(heads, float("nan")), dv.masked_fill(heads, float("nan"))
        report = backward_report(got, group, detected, corrected)
    return dq, dk, dv, reduce_to(ds, bias) if bias_grad else None, report


def backward_report(got: BackwardLaunch, group, detected: Tensor, corrected: Tensor) -> Report:
    """The backward's ``Report``: one ``CheckResult`` per check of ``BACKWARD_ROW_CHECKS``
    (per query row, ``(B, N, T)``), ``BACKWARD_KEY_CHECKS`` (per key, ``(B, K, S)``) and
    ``BACKWARD_GROUP_CHECKS`` (per head group, ``(B, K)``)."""
    results = dict(zip(BACKWARD_GROUP_CHECKS, group))
    for names, stats, flags in ((BACKWARD_ROW_CHECKS, got.row_stats, got.row_flags),
                                (BACKWARD_KEY_CHECKS, got.key_stats, got.key_flags)):
        for i, name in enumerate(names):
            results[name] = CheckResult(stats[2 * i], stats[2 * i + 1], flags[i])
    finite = torch.ones((), dtype=torch.bool, device=detected.device)
    return make_report(detected=detected, checks=results, inputs_finite=finite, located={}, corrected=corrected,
                       combined=True)


def run(query: Tensor, key: Tensor, value: Tensor, *, checks: tuple[str, ...], granularity: str, scale: float,
        is_causal: bool, on_fault: str = "report", plan: FaultPlan | None = None, bias=None, mask=None,
        query_lengths=None, key_lengths=None, window=None, backward_hook: Callable[[Report], None] | None = None,
        lse_out: Tensor | None = None):
    """The fused path: inputs validated, the catalogue and :func:`.launch.unsupported` consulted;
    ``checks`` are those to run. The mask arguments are those of ``ftattn_spec.masking`` (validated).

    When a gradient is needed, the output carries the fused backward (:func:`checked_backward`),
    whose report goes to ``backward_hook``. ``lse_out`` (float32 ``(B, N, T)``) receives the rows'
    log-sum-exp without autograd (the custom operator keeps it for its own backward)."""
    dev = query.device
    wanted = tuple(checks)
    grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (query, key, value, bias))
    with torch.no_grad():
        q = faults.inject(query.detach(), "query", "BNTH", plan)
        k = faults.inject(key.detach(), "key", "BKSH", plan)
        v = faults.inject(value.detach(), "value", "BKSH", plan)
        glob = granularity == "global"
        masks = Masks(mask, None if bias is None else bias.detach(), query_lengths, key_lengths, window, is_causal)
        lse = torch.empty(query.shape[:3], dtype=torch.float32, device=dev) if grad else lse_out
        out, stats, flags, count, bs, _ = forward(q, k, v, scale=scale, is_causal=is_causal, masks=masks,
                                                  checks_on=bool(wanted), plan=plan, signed=glob, which=wanted,
                                                  lse=lse)
        # the kernels counted the corrupted inputs, not the caller's: judge those here
        inputs_hit = faults.targets_any(plan, ("query", "key", "value"))
        finite = (torch.isfinite(query).all() & torch.isfinite(key).all() & torch.isfinite(value).all()
                  if inputs_hit else count[1] == 0)
        results, rows = {}, None
        for name in wanted:
            i = STAT_PLANES[name]
            if glob:
                results[name] = verdict(stats[2 * i], stats[2 * i + 1], granularity,
                                        signed=name not in ("softmax_dmr", "softmax_exp"),
                                        ratio=name == "softmax_exp")
            else:
                results[name] = CheckResult(stats[2 * i], stats[2 * i + 1], flags[i])
        if on_fault in ("correct", "nan"):  # the rows any check flagged
            for r in results.values():
                flag = r.flagged[..., None].expand(*r.flagged.shape, query.shape[2]) if glob else r.flagged
                rows = flag if rows is None else rows | flag
        combined = not (glob or inputs_hit or not wanted)
        if not wanted:
            detected = torch.zeros((), dtype=torch.bool, device=dev)
        elif glob:
            detected = torch.stack([r.flagged.any() for r in results.values()]).any()
        else:  # flagged rows or non-finite inputs, in one launch
            detected = count.any() if combined else count[0] > 0
        corrected = torch.zeros((), dtype=torch.int32, device=dev)
        if on_fault == "correct" and rows is not None and bool(detected):
            B, N, T, _ = query.shape
            blk = torch.nn.functional.pad(rows, (0, -T % bs.block_m)).view(B * N, -1, bs.block_m).any(-1)
            bn, mb = torch.nonzero(blk, as_tuple=True)
            redo = torch.stack([mb, bn], dim=1).to(torch.int32).contiguous()
            forward(q, k, v, scale=scale, is_causal=is_causal, checks_on=False, blocks=bs, redo=redo, out=out,
                    masks=masks, lse=lse)
            corrected += rows.sum(dtype=torch.int32)
        if on_fault == "nan" and rows is not None:
            out = out.masked_fill(rows[..., None], float("nan"))
    if grad:
        settings = Backward(scale, masks, bool(wanted), plan, on_fault, bs.block_n, backward_hook)
        out = _Attention.apply(query, key, value, bias, out, lse, settings)
    return out, make_report(detected=detected, checks=results, inputs_finite=finite, located={}, corrected=corrected,
                            combined=combined)
