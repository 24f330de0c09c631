"""Ring attention with checks over the ranks of a ``torch.distributed`` group (``ftattn_spec.ring``).

Each rank holds one chunk of the query sequence and one of the keys and values, in SDPA's layout:
``(B, N, Tc, H)`` and ``(B, K, Sc, H)``. At each of the P steps it computes one checked block,
with the fused Triton kernel (its log-sum-exp saved by the kernel) where it can run, else with the
unfused core (``unfused.block``), merges it into its output by the log-sum-exp, and
sends its key and value chunk (with their home checksums) to rank ``r + 1`` while it receives the
next from rank ``r − 1`` (gloo on CPUs, NCCL on GPUs). One all-reduce at the end makes the
verdict and the (rank × step) table global; under NCCL they stay on the device, so a call does
not wait for the GPU unless ``on_fault="raise"`` (or the caller) reads the verdict. Gradients: when an input requires them, the call is a
``torch.autograd.Function`` whose backward recomputes the blocks around the ring again, by the
fused Triton backward where the blocks were fused (:mod:`.ring_fused_backward`), else unfused
(:mod:`.ring_backward`), checked when the scheme runs checks: its verdict, global after one more
all-reduce, is counted under ``site + " (backward)"`` and raised on every rank under ``"raise"``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from ftattn_spec import implementations, policy, ring
from ftattn_spec import ring_backward as spec_ring_backward
from ftattn_spec import validation as v
from ftattn_spec.faults import FaultDetected
from ftattn_spec.report import CheckResult, Ran, Report

from . import counters, faults, fused, ring_backward, ring_fused_backward, unfused

F32 = torch.float32


def _check(residual, threshold) -> CheckResult:
    residual = residual.to(F32)
    threshold = torch.as_tensor(threshold, dtype=F32, device=residual.device).expand_as(residual)
    return CheckResult(residual, threshold, ~((residual <= threshold) & threshold.isfinite()))


def _worse(best: CheckResult | None, new: CheckResult) -> CheckResult:
    if best is None:
        return new
    ratio = lambda c: torch.where(c.flagged, torch.inf, c.residual / c.threshold)  # noqa: E731
    take = ratio(new) > ratio(best)
    return CheckResult(torch.where(take, new.residual, best.residual),
                       torch.where(take, new.threshold, best.threshold), best.flagged | new.flagged)


def _sums(x: torch.Tensor):
    w = x.to(torch.float64 if x.dtype == torch.float64 else F32)
    return w.sum(2), w.abs().sum(2)  # over the chunk's keys: (B, K, H)


def _fused_block(query, key, value, plan, *, checks: tuple[str, ...], scale: float, is_causal: bool):
    """One block by the Triton kernel: ``(unfused.Block, Report)``. The kernel saves each row's
    log-sum-exp in base 2 of the scaled logits (+inf where nothing is attended); the ring wants it
    in base e, −inf there. The kernel's checks cover its m and l; no second log-sum-exp is made."""
    lse2 = torch.empty(query.shape[:3], dtype=F32, device=query.device)
    out, rep = fused.run(query, key, value, checks=checks, granularity="vector", scale=scale, is_causal=is_causal,
                         plan=plan, lse_out=lse2)
    lse = torch.where(lse2 == torch.inf, -torch.inf, lse2 * math.log(2.0))
    work = torch.float64 if query.dtype == torch.float64 else F32
    return unfused.Block(out.to(work), lse, None, torch.zeros_like(lse)), rep


def _implementation(implementation, query, scheme: str, dtype: str) -> tuple[str, str | None]:
    """The blocks' implementation, ``(name, why "auto" fell back or None)``, or an error naming
    ``implementation``: the drop-ins' choice (``implementations.select``) for one rank's chunk."""
    impl, fallback = implementations.select("torch", implementations.resolve("torch", implementation),
                                            device_reason=fused.auto_reason(query.device.type), scheme=scheme,
                                            dtype=dtype,
                                            q_shape=tuple(int(n) for n in query.shape))
    if impl == "triton" and (why := fused.unsupported(query.device.type)) is not None:  # named, off a GPU
        raise ValueError(why)
    return impl, fallback


def _exchange(tensors, me: int, P: int, group):
    """Send ``tensors`` to rank ``me + 1`` and receive the same shapes from ``me − 1``."""
    nxt, prv = dist.get_global_rank(group, (me + 1) % P) if group else (me + 1) % P, \
        dist.get_global_rank(group, (me - 1) % P) if group else (me - 1) % P
    got = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), nxt, group) for t in tensors] + \
          [dist.P2POp(dist.irecv, g, prv, group) for g in got]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return got


def ring_attention(query, key, value, *, group=None, scheme: str = "full", scale: float | None = None,
                   is_causal: bool = False, on_fault: str = "report", fault=None, site: str | int | None = None,
                   implementation: str | None = None):
    """Checked ring attention over the ranks of ``group`` (default: the world): ``(out, RingReport)``.

    Args:
      query: this rank's query chunk ``(B, N, Tc, H)``; key, value: its chunk ``(B, K, Sc, H)``
        (rank ``r`` holds rows ``r·Tc .. (r+1)·Tc − 1`` of the global sequence, and keys likewise).
      scheme: one of ``ftattn_spec.SCHEME_NAMES``; each block runs the scheme's row checks.
      scale: logit scale, default ``H ** -0.5``; is_causal: upper-left causal over the global
        sequence (needs ``Tc == Sc``).
      on_fault: ``"report"`` or ``"raise"`` (``FaultDetected`` on every rank).
      fault: a ``ftattn_spec.ring.RingFault`` or a sequence of them, the same on every rank
        (global indices; each rank injects its own).
      site: the name the call is counted under in ``ftattn_torch.counters``.
      implementation: what computes each block: ``"auto"`` (default: the fused Triton kernel on a
        GPU when the scheme and shapes allow, else the unfused core; ``report.blocks.ran`` says which
        and why), ``"triton"`` or ``"unfused"``. The fused blocks' log-sum-exp is checked through the
        kernel's softmax checks only (no ``lse`` ring check per block; docs/training.md).

    Returns:
      ``out`` ``(B, N, Tc, H)`` in the input dtype, and a ``ftattn_spec.ring.RingReport`` whose
      per-row fields cover this rank's rows, whose ``detected`` and ``steps`` are global.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: ring_attention needs an initialized torch.distributed process group, got none")
    if on_fault not in ("report", "raise"):
        raise ValueError(f"on_fault: expected 'report' or 'raise' (the ring repairs nothing), got {on_fault!r}")
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    site = policy.validate_site(site) or policy.caller_site()
    P, me = dist.get_world_size(group), dist.get_rank(group)
    B, N, Tc, H = query.shape if query.ndim == 4 else (0, 0, 0, 0)
    glob = lambda x, n: (*x.shape[:2], x.shape[2] * n, *x.shape[3:]) if x.ndim == 4 else tuple(x.shape)  # noqa: E731
    cfg = v.validate_attention("torch", (glob(query, P), glob(key, P), glob(value, P)),
                               [(str(x.dtype).removeprefix("torch."), x.is_floating_point())
                                for x in (query, key, value)],
                               scheme=scheme, granularity="vector", scale=scale, is_causal=is_causal,
                               on_fault="report", implementation="unfused")
    ring.validate_ring(cfg.dims, P, cfg.is_causal, "group")
    impl, fallback = _implementation(implementation, query, cfg.scheme, cfg.dtype)
    if fallback is not None and query.device.type == "cuda":
        implementations.warn_fallback("torch", fallback)
    checks = ring.row_checks(implementations.checks_for("torch", impl, cfg.scheme))
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
    why = (None if grad and checks else f"scheme {cfg.scheme!r} runs no checks" if grad
           else "no input requires a gradient, so no backward runs")
    plan = ring.plan(fault, cfg.dims, P, cfg.dtype, checks, implementation=impl, backward=why)
    args = (plan, me, P, group, checks, cfg.scale, cfg.is_causal, impl, fallback)
    if grad:
        held: list = []
        after = _AfterBackward(f"{site} (backward)", on_fault, bool(checks),
                               spec_ring_backward.unit(cfg.dtype, unfused.uses_tf32(query)))
        out = _Ring.apply(query, key, value, args, held, after)
        report = held[0]
    else:
        with torch.no_grad():
            out, report, _ = _ring(query, key, value, *args)
    counters.record(site, report.blocks._replace(detected=report.detected))
    if on_fault == "raise" and bool(report.detected):
        raise FaultDetected(report)
    return out, report


def _ring(query, key, value, plan, me: int, P: int, group, checks, scale: float, is_causal: bool, impl: str,
          fallback: str | None):
    B, N, Tc, H = query.shape
    Sc = key.shape[2]
    dev = query.device
    block = functools.partial(unfused.block if impl == "unfused" else _fused_block, checks=checks, scale=scale)
    home = [*_sums(key), *_sums(value)]
    finite = query.isfinite().all() & key.isfinite().all() & value.isfinite().all()  # on the device: no host sync
    best: dict[str, CheckResult | None] = {c: None for c in (*checks, "lse", "weights", "merge", "key", "value")}
    steps, lses = torch.zeros(P, dtype=torch.bool, device=dev), []
    o = c = a = lse = None
    for r in range(P):
        j = (me - r) % P
        kr, vr = faults.inject_ring(key, plan, me, r, "key"), faults.inject_ring(value, plan, me, r, "value")
        flags = []
        for name, x, (s0, a0) in (("key", kr, home[:2]), ("value", vr, home[2:])):
            res = _check(((_sums(x)[0] - s0).abs() / ring.transit_threshold(Sc, a0)).amax(-1),
                         torch.ones((B, x.shape[1]), device=dev))
            best[name] = _worse(best[name], res)
            flags.append(res.flagged.any())
        if is_causal and j > me:  # above the diagonal: nothing attended
            blk = unfused.Block(torch.zeros(B, N, Tc, H, dtype=home[0].dtype, device=dev),
                                torch.full((B, N, Tc), -torch.inf, device=dev), None, torch.zeros(B, N, Tc, device=dev))
            rep = None
        else:
            blk, rep = block(query, kr, vr, faults.core_plan(plan, me, r, ring.BLOCK_SITES), is_causal=is_causal and j == me)
        if rep is not None:
            for name in checks:
                best[name] = _worse(best[name], rep.checks[name])
                flags.append(rep.checks[name].flagged.any())
        lse_j = faults.inject_ring(blk.lse, plan, me, r, "lse")
        lses.append(lse_j)
        if blk.lse_check is not None:
            both = (lse_j == -torch.inf) & (blk.lse_check == -torch.inf)
            res = _check(torch.where(both, 0.0, (lse_j - blk.lse_check).abs()), ring.lse_threshold(Sc, blk.mu))
            best["lse"] = _worse(best["lse"], res)
            flags.append(res.flagged.any())
        o_j = blk.out  # B N Tc H
        c_j, a_j = o_j.sum(-1), o_j.abs().sum(-1)
        if r == 0:
            o, c, a, lse = o_j, c_j, a_j, lse_j
        else:
            m = torch.maximum(lse, lse_j)
            m = torch.where(m.isfinite(), m, 0.0)
            new = m + ((lse - m).exp() + (lse_j - m).exp()).log()
            w0, w1 = (lse - new).exp(), (lse_j - new).exp()
            res = _check((w0 + w1 - 1.0).abs(), ring.weight_threshold(new.abs()))
            best["weights"] = _worse(best["weights"], res)
            flags.append(res.flagged.any())
            o = w0[..., None] * o + w1[..., None] * o_j
            c, a, lse = w0 * c + w1 * c_j, w0 * a + w1 * a_j, new
        o = faults.inject_ring(o, plan, me, r, "merge")
        res = _check((o.sum(-1) - c).abs(), ring.merge_threshold(r + 1, H, a))
        best["merge"] = _worse(best["merge"], res)
        flags.append(res.flagged.any())
        steps[r] = torch.stack(flags).any()
        if r < P - 1:
            key, value, *home = _exchange([key, value, *home], me, P, group)
    stack = torch.stack(lses)
    top = stack.amax(0)
    top = torch.where(top.isfinite(), top, 0.0)
    again = top + (stack - top).exp().sum(0).log()
    gap = torch.where((lse == -torch.inf) & (again == -torch.inf), 0.0, (lse - again).abs())
    best["lse"] = _worse(best["lse"], _check(gap, P * ring.weight_threshold(again.abs())))
    blocks = {n: best[n] for n in checks}
    zero = torch.zeros_like(c)
    ring_checks = {"lse": best["lse"], "weights": best["weights"] or _check(zero, torch.ones_like(c)),
                   "merge": best["merge"],
                   "key": CheckResult(*(x[None] for x in best["key"])),
                   "value": CheckResult(*(x[None] for x in best["value"]))}
    local = torch.stack([x.flagged.any() for x in (*blocks.values(), *ring_checks.values())]).any()
    report, steps_all = _global_report(local, finite, steps, blocks, me, P, group, dev, Ran(impl, fallback))
    return o.to(query.dtype), ring.RingReport(report.detected, report, ring_checks, steps_all), lse


def _global_report(local, finite, steps, checks, me: int, P: int, group, dev, ran: Ran):
    """One all-reduce (MAX) of this rank's verdict, its inputs' finiteness and its row of the
    rank × step table (bool tensors on ``dev``): the global ``Report`` over ``checks`` and the
    ``(P, P)`` table of steps. Built and reduced on the device under NCCL, so no host sync
    (gloo reduces CPU tensors: a copy there)."""
    row = torch.zeros(P, P, dtype=torch.int32, device=dev)
    row[me] = steps.to(torch.int32)
    table = torch.cat([torch.stack([local, ~finite]).to(torch.int32), row.reshape(-1)])
    if dist.get_backend(group) != "nccl":
        table = table.cpu()
    dist.all_reduce(table, op=dist.ReduceOp.MAX, group=group)
    table = table.to(dev)
    report = Report(detected=(table[0] | table[1]) > 0, checks=checks, inputs_finite=table[1] == 0,
                    located={}, corrected=torch.zeros((), dtype=torch.int32, device=dev), ran=ran)
    return report, table[2:].reshape(P, P) > 0


class _AfterBackward(NamedTuple):
    """What the backward does with its verdict: the counters' site, the policy, whether it checks,
    and the products' unit roundoff."""

    site: str
    on_fault: str
    checked: bool
    u: float


def _backward_report(res: ring_backward.BackwardChecks, me: int, P: int, group, dev, ran: Ran) -> ring.RingReport:
    """The backward's verdict made global by one all-reduce (as the forward's): a ``RingReport``
    whose ``blocks`` holds one ``CheckResult`` per ``ftattn_spec.ring_backward.CHECKS`` (ratios
    over threshold 1: ``(B, N, Tc)`` for this rank's rows, ``(B, K, Sc)`` for its keys)."""
    local = torch.stack([(~(x <= 1.0)).any() for x in res.ratios.values()]).any()
    checks = {n: CheckResult(x.float(), torch.ones_like(x, dtype=F32), ~(x <= 1.0)) for n, x in res.ratios.items()}
    report, steps_all = _global_report(local, res.finite, res.steps, checks, me, P, group, dev, ran)
    return ring.RingReport(report.detected, report, {}, steps_all)


class _Ring(torch.autograd.Function):
    """The ring as one autograd node: the forward of :func:`_ring`, the backward of
    :func:`.ring_backward.backward` (the forward's report leaves through ``held``; the backward's
    goes to the counters, and is raised under ``"raise"``)."""

    @staticmethod
    def forward(ctx, query, key, value, args, held, after):
        out, report, lse = _ring(query, key, value, *args)
        held.append(report)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.args, ctx.after = args, after
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        plan, me, P, group, _, scale, is_causal, impl, fallback = ctx.args
        after = ctx.after
        exchange = lambda ts: _exchange(ts, me, P, group)  # noqa: E731
        if impl in ring.FUSED_BACKWARD:
            dq, dk, dv, res = ring_fused_backward.backward(
                query, key, value, out, lse, grad_out, scale=scale, is_causal=is_causal, me=me, P=P,
                exchange=exchange, checked=after.checked, plan=plan)
        else:
            dq, dk, dv, res = ring_backward.backward(
                query, key, value, out, lse, grad_out, scale=scale, is_causal=is_causal, me=me, P=P,
                exchange=exchange, checked=after.checked, plan=plan, u=after.u)
        if res is not None:
            report = _backward_report(res, me, P, group, query.device, Ran(impl, fallback))
            counters.record(after.site, report.blocks)
            if after.on_fault == "raise" and bool(report.detected):
                raise FaultDetected(report)
        return dq, dk, dv, None, None, None


__all__ = ["ring_attention"]
