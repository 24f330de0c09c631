"""Sequence-parallel ring attention with checks, on ``jax.shard_map`` (``ftattn_spec.ring``).

:func:`ring_attention` splits the query, key and value sequences over one mesh axis; each device
keeps its query chunk, computes one checked block per step (the portable Pallas kernel, which
saves each row's log-sum-exp, where ``"auto"`` takes the fused path; else the unfused core,
``unfused.block``), merges the partial outputs by their log-sum-exp, and passes its key and value
chunk (with their home checksums) to the next device with ``lax.ppermute``. :func:`ring_local` is
the per-device function, for a caller that runs its own ``shard_map``.

Gradients: the backward recomputes the blocks around the ring from the merged log-sum-exp: after
fused blocks by one launch of the portable Pallas backward per step (:mod:`.ring_fused_backward`),
else unfused (:mod:`.ring_backward`, one block of memory per step). Through :func:`ring_attention` it is checked
when the scheme checks anything, and its verdict is counted under ``site + " (backward)"``; the
backward of :func:`ring_local` (whose caller owns the ``shard_map``) is not checked.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import checkify
from jax.sharding import Mesh, PartitionSpec as PS

from ftattn_spec import implementations, policy, ring
from ftattn_spec import ring_backward as spec_ring_backward
from ftattn_spec import ring_fused_backward as spec_ring_fused_backward
from ftattn_spec import validation as v
from ftattn_spec.faults import FaultDetected
from ftattn_spec.report import CheckResult, Ran, Report

from . import counters, fused, ring_backward, ring_fused_backward, unfused
from .common import F32, as_stored
from .ring_faults import core_plan, inject as _inject


def _check(residual, threshold) -> CheckResult:
    residual, threshold = residual.astype(F32), threshold.astype(F32)
    return CheckResult(residual, threshold, ~((residual <= threshold) & jnp.isfinite(threshold)))


def _worse(best: CheckResult | None, new: CheckResult) -> CheckResult:
    """Per element, the residual and threshold of the larger ratio; flagged if either is."""
    if best is None:
        return new
    ratio = lambda c: jnp.where(c.flagged, jnp.inf, c.residual / c.threshold)  # noqa: E731
    take = ratio(new) > ratio(best)
    return CheckResult(jnp.where(take, new.residual, best.residual), jnp.where(take, new.threshold, best.threshold),
                       best.flagged | new.flagged)


def _sums(x):
    """Column sums over the chunk's keys, and of the magnitudes: ``(B, K, H)`` each."""
    w = x.astype(jnp.float64 if x.dtype == jnp.float64 else F32)
    return w.sum(axis=1), jnp.abs(w).sum(axis=1)


def _fused_block(query, key, value, plan, *, checks: tuple[str, ...], scale: float, is_causal: bool):
    """One block by the portable Pallas kernel: ``(unfused.Block, Report)``. The kernel's checks
    cover its m and l; no second log-sum-exp is made (``lse_check`` None)."""
    out, lse, rep = fused.runner.block(query, key, value, plan, checks=checks, scale=scale, is_causal=is_causal)
    work = jnp.float64 if query.dtype == jnp.float64 else F32
    return unfused.Block(out.astype(work), lse, None, jnp.zeros_like(lse)), rep


def ring_local(query, key, value, plan=None, *, axis_name, axis_size: int, checks: tuple[str, ...], scale: float,
               is_causal: bool, implementation: str = "unfused"):
    """One device's part of the ring, inside ``shard_map`` (or a ``vmap``) over ``axis_name``
    (``axis_size`` devices): local ``(B, Tc, N, H)`` and ``(B, Sc, K, H)`` chunks; ``plan`` a
    ``RingPlan`` of arrays (``ring.plan``) or None; ``implementation`` ``"unfused"`` or
    ``"pallas"`` (the blocks). Returns ``(out, blocks, ring_checks, steps, inputs_finite)`` local
    to the device (``out`` in the working precision, ``steps`` ``(1, P)``, the ``key``/``value``
    results ``(1, B, K)``). Differentiable in the three chunks (:mod:`.ring_backward`)."""
    static = _Static(axis_name, int(axis_size), tuple(checks), float(scale), bool(is_causal), implementation)
    return _ring_vjp(query, key, value, plan, static)


def _zero_cotangent(x):
    return np.zeros(x.shape, jax.dtypes.float0) if not jnp.issubdtype(x.dtype, jnp.inexact) else jnp.zeros_like(x)


class _Static(NamedTuple):
    axis_name: object
    axis_size: int
    checks: tuple[str, ...]
    scale: float
    is_causal: bool
    implementation: str


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring_vjp(query, key, value, plan, static: _Static):
    return _forward(query, key, value, plan, static)[0]


def _ring_fwd(query, key, value, plan, static: _Static):
    got, lse = _forward(query, key, value, plan, static)
    return got, (query, key, value, plan, got[0], lse)


def _ring_bwd(static: _Static, saved, cts):
    query, key, value, plan, out, lse = saved
    query, key, value, out, do = as_stored(query, key, value, out, cts[0])
    if static.implementation in ring.FUSED_BACKWARD:
        dq, dk, dv = ring_fused_backward.backward(query, key, value, out, lse, do, scale=static.scale,
                                                  is_causal=static.is_causal, axis_name=static.axis_name,
                                                  axis_size=static.axis_size, checks=())
    else:
        dq, dk, dv = ring_backward.backward(query, key, value, out, lse, do, scale=static.scale,
                                            is_causal=static.is_causal, axis_name=static.axis_name,
                                            axis_size=static.axis_size)
    return dq, dk, dv, jax.tree.map(_zero_cotangent, plan)


_ring_vjp.defvjp(_ring_fwd, _ring_bwd)


def _forward(query, key, value, plan, static: _Static):
    """The ring's forward: ``((out, blocks, ring_checks, steps, inputs_finite), merged lse)``."""
    axis_name, P, checks, scale, is_causal, impl = static
    query, key, value = as_stored(query, key, value)  # the blocks' products and the ring's sums read the same values
    me = lax.axis_index(axis_name)
    B, Tc, N, H = query.shape
    Sc = key.shape[1]
    checks = ring.row_checks(checks)
    home = (_sums(key), _sums(value))
    finite = jnp.all(jnp.isfinite(query)) & jnp.all(jnp.isfinite(key)) & jnp.all(jnp.isfinite(value))
    block = functools.partial(unfused.block if impl == "unfused" else _fused_block, checks=checks, scale=scale)
    best: dict[str, CheckResult | None] = {c: None for c in (*checks, "lse", "weights", "merge", "key", "value")}
    steps, lses = [], []
    o = c = a = lse = None
    perm = [(i, (i + 1) % P) for i in range(P)]
    for r in range(P):
        kr = _inject(key, plan, me, r, "key", (0, 2, 1, 3))  # local index (b, k, s, h); key is B S K H
        vr = _inject(value, plan, me, r, "value", (0, 2, 1, 3))
        flags = []
        for name, x, (s0, a0) in (("key", kr, home[0]), ("value", vr, home[1])):
            s1, _ = _sums(x)
            res = _check(jnp.max(jnp.abs(s1 - s0) / ring.transit_threshold(Sc, a0), axis=-1), jnp.ones((B, x.shape[2])))
            best[name] = _worse(best[name], res)
            flags.append(jnp.any(res.flagged))
        cplan = core_plan(plan, me, r, ring.BLOCK_SITES)
        if is_causal:
            j = (me - r) % P
            branch = jnp.where(j < me, 0, jnp.where(j == me, 1, 2))
            full = lambda q, k, vv, pl: block(q, k, vv, pl, is_causal=False)  # noqa: E731
            diag = lambda q, k, vv, pl: block(q, k, vv, pl, is_causal=True)  # noqa: E731
            shape = jax.eval_shape(full, query, kr, vr, cplan)

            def skip(q, k, vv, pl, shape=shape):
                z = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape)
                b, rep = z
                neg = jnp.full(b.lse.shape, -jnp.inf, b.lse.dtype)
                return b._replace(lse=neg, lse_check=None if b.lse_check is None else neg), rep._replace(
                    inputs_finite=jnp.ones((), bool))
            blk, rep = lax.switch(branch, (full, diag, skip), query, kr, vr, cplan)
        else:
            blk, rep = block(query, kr, vr, cplan, is_causal=False)
        for name in checks:
            best[name] = _worse(best[name], rep.checks[name])
            flags.append(jnp.any(rep.checks[name].flagged))
        lse_j = _inject(blk.lse, plan, me, r, "lse", (0, 1, 2))
        lses.append(lse_j)
        if blk.lse_check is not None:
            gap = jnp.where((lse_j == -jnp.inf) & (blk.lse_check == -jnp.inf), 0.0, jnp.abs(lse_j - blk.lse_check))
            res = _check(gap, ring.lse_threshold(Sc, blk.mu))
            best["lse"] = _worse(best["lse"], res)
            flags.append(jnp.any(res.flagged))
        o_j = blk.out  # B Tc N H, working precision
        c_j, a_j = jnp.swapaxes(o_j.sum(-1), 1, 2), jnp.swapaxes(jnp.abs(o_j).sum(-1), 1, 2)  # B N Tc
        if r == 0:
            o, c, a, lse = o_j, c_j, a_j, lse_j
        else:
            m = jnp.maximum(lse, lse_j)
            m = jnp.where(jnp.isfinite(m), m, 0.0)
            new = m + jnp.log(jnp.exp(lse - m) + jnp.exp(lse_j - m))
            w0, w1 = lax.optimization_barrier((jnp.exp(lse - new), jnp.exp(lse_j - new)))
            res = _check(jnp.abs(w0 + w1 - 1.0), ring.weight_threshold(jnp.abs(new)))
            best["weights"] = _worse(best["weights"], res)
            flags.append(jnp.any(res.flagged))
            t = lambda w: jnp.swapaxes(w, 1, 2)[..., None]  # noqa: E731  B N Tc -> B Tc N 1
            o = t(w0) * o + t(w1) * o_j
            c, a, lse = w0 * c + w1 * c_j, w0 * a + w1 * a_j, new
        o = _inject(o, plan, me, r, "merge", (0, 2, 1, 3))  # local index (b, n, t, h); o is B Tc N H
        # the merged output's row sums against the merged ones (linear in the blocks, so the same
        # recursion): a fault in this step's merge is flagged at this step
        res = _check(jnp.abs(jnp.swapaxes(o.sum(-1), 1, 2) - c), ring.merge_threshold(r + 1, H, a))
        best["merge"] = _worse(best["merge"], res)
        flags.append(jnp.any(res.flagged))
        steps.append(functools.reduce(jnp.logical_or, flags))
        if r < P - 1:
            key, value, home = lax.ppermute((key, value, home), axis_name, perm)
    # the running log-sum-exp against one evaluated from the blocks' at once
    stack = jnp.stack(lses)
    top = jnp.max(stack, axis=0)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    again = top + jnp.log(jnp.sum(jnp.exp(stack - top), axis=0))
    gap = jnp.where((lse == -jnp.inf) & (again == -jnp.inf), 0.0, jnp.abs(lse - again))
    best["lse"] = _worse(best["lse"], _check(gap, P * ring.weight_threshold(jnp.abs(again))))
    blocks = {name: best[name] for name in checks}
    ring_checks = {"lse": best["lse"], "weights": best["weights"] or _check(jnp.zeros_like(c), jnp.ones_like(c)),
                   "merge": best["merge"],
                   "key": jax.tree.map(lambda x: x[None], best["key"]),
                   "value": jax.tree.map(lambda x: x[None], best["value"])}
    return (o, blocks, ring_checks, jnp.stack(steps)[None], finite), lse


def ring_attention(query, key, value, *, mesh: Mesh, axis_name: str, scheme: str = "full", scale: float | None = None,
                   is_causal: bool = False, on_fault: str = "report", fault=None, site: str | int | None = None,
                   implementation: str | None = None):
    """Checked ring attention over mesh axis ``axis_name``: ``(out, ftattn_spec.ring.RingReport)``.

    Args:
      query: ``(B, T, N, H)``; key, value: ``(B, S, K, H)`` (``jax.nn.dot_product_attention``'s
        layout, float16, bfloat16, float32 or float64), ``T`` and ``S`` divisible by the axis size;
        they are split along the sequence over ``axis_name`` (other mesh axes replicate them).
      mesh: a ``jax.sharding.Mesh``; axis_name: one of its axis names.
      scheme: one of ``ftattn_spec.SCHEME_NAMES``; each block runs the scheme's row checks.
      scale: logit scale, default ``H ** -0.5``.
      is_causal: upper-left causal mask over the global sequence (needs ``T == S``).
      on_fault: ``"report"`` or ``"raise"`` (as in ``ftattn_jax.attention``).
      fault: a ``ftattn_spec.ring.RingFault`` or a sequence of them (traced data: one compilation
        serves every fault of the same count).
      site: the name the call is counted under in ``ftattn_jax.counters``.
      implementation: what computes each block: ``"auto"`` (default: the portable Pallas kernel,
        which saves each row's log-sum-exp, when the mesh is on GPUs and the scheme, dtype and
        head dim allow; else the unfused core; ``report.blocks.ran`` says which and why),
        ``"pallas"`` (interpreted off a GPU) or ``"unfused"``. A fused block's log-sum-exp is
        checked through the kernel's softmax checks only (no per-block ``lse`` ring check, and
        ``lse`` faults are refused; docs/training.md).

    Returns:
      ``out`` ``(B, T, N, H)`` in the input dtype, sharded along T over ``axis_name``, and a
      ``RingReport`` whose per-row fields are sharded the same way.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name: expected one of the mesh's axes {tuple(mesh.axis_names)}, got {axis_name!r}")
    if on_fault not in ("report", "raise"):
        raise ValueError(f"on_fault: expected 'report' or 'raise' (the ring repairs nothing), got {on_fault!r}")
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, (jax.Array, np.ndarray)):
            raise TypeError(f"{name}: expected a jax.Array or numpy.ndarray, got {type(x).__name__}")
    site = policy.validate_site(site) or policy.caller_site()
    cfg = v.validate_attention("jax", (query.shape, key.shape, value.shape),
                               [(jnp.dtype(x.dtype).name, bool(jnp.issubdtype(x.dtype, jnp.floating)))
                                for x in (query, key, value)],
                               scheme=scheme, granularity="vector", scale=scale, is_causal=is_causal,
                               on_fault="report", implementation="unfused")
    P = int(mesh.shape[axis_name])
    Tc, _ = ring.validate_ring(cfg.dims, P, cfg.is_causal, axis_name)
    impl, fallback = _implementation(implementation, mesh, cfg, (cfg.dims["B"], Tc, cfg.dims["N"], cfg.dims["H"]))
    checks = ring.row_checks(implementations.checks_for("jax", impl, cfg.scheme))
    rp = ring.plan(fault, cfg.dims, P, cfg.dtype, checks, implementation=impl,
                   backward=None if checks else f"scheme {cfg.scheme!r} runs no checks")
    after = _AfterBackward(f"{site} (backward)", on_fault, spec_ring_backward.unit(cfg.dtype))
    out, report = _ring(mesh, axis_name, P, checks, cfg.scale, cfg.is_causal, impl, after)(
        query, key, value, None if rp is None else jax.tree.map(jnp.asarray, rp))
    report = report._replace(blocks=report.blocks._replace(ran=Ran(impl, fallback)))
    counters.record(site, report.blocks._replace(detected=report.detected))
    if on_fault == "raise":
        if isinstance(report.detected, jax.core.Tracer):
            checkify.check(~report.detected, "ftattn: a fault was detected in ring attention")
        elif bool(report.detected):
            raise FaultDetected(report)
    return out, report


def _implementation(implementation, mesh: Mesh, cfg, chunk: tuple[int, ...]) -> tuple[str, str | None]:
    """The blocks' implementation, ``(name, why "auto" fell back or None)``, or an error naming
    ``implementation``: the drop-ins' choice (``implementations.select``) for one device's chunk."""
    platform = mesh.devices.flat[0].platform
    impl, fallback = implementations.select(
        "jax", implementations.resolve("jax", implementation),
        device_reason=None if platform == "gpu" else f"not on a GPU (the mesh is on {platform})",
        scheme=cfg.scheme, dtype=cfg.dtype, q_shape=chunk)
    if fallback is not None and platform == "gpu":
        implementations.warn_fallback("jax", fallback)
    return impl, fallback


class _AfterBackward(NamedTuple):
    """What the checked backward does with its verdict: the counters' site, the policy (``"raise"``
    poisons the gradients with NaN and warns: a traced backward cannot raise), the products' unit."""

    site: str
    on_fault: str
    u: float


def _global(finite, flags, axis_name: str):
    """This device's finiteness and flags made global over the ring (a ``pmin`` and a ``pmax``):
    ``(finite, detected)``, where a non-finite input anywhere counts as detected."""
    finite = lax.pmin(finite.astype(jnp.int32), axis_name) > 0
    local = functools.reduce(jnp.logical_or, [jnp.any(f) for f in flags])
    detected = lax.pmax(local.astype(jnp.int32), axis_name) > 0
    return finite, detected | ~finite


@functools.lru_cache(maxsize=64)
def _ring(mesh: Mesh, axis_name: str, P: int, checks: tuple[str, ...], scale: float, is_causal: bool, impl: str,
          after: _AfterBackward):
    seq, rows = PS(None, axis_name, None, None), PS(None, None, axis_name)
    row = CheckResult(rows, rows, rows)
    per_device = CheckResult(PS(axis_name), PS(axis_name), PS(axis_name))
    static = _Static(axis_name, P, tuple(checks), float(scale), bool(is_causal), impl)
    checked = bool(checks)

    def body(q, k, vv, rp):
        (o, blocks, ring_checks, steps, finite), lse = _forward(q, k, vv, rp, static)
        finite, detected = _global(finite, [c.flagged for c in (*blocks.values(), *ring_checks.values())], axis_name)
        return (o.astype(q.dtype), blocks, ring_checks, steps, finite, detected), (o, lse)

    specs = (seq, {c: row for c in checks},
             {"lse": row, "weights": row, "merge": row, "key": per_device, "value": per_device},
             PS(axis_name), PS(), PS())
    mapped = jax.shard_map(body, mesh=mesh, in_specs=(seq, seq, seq, PS()), out_specs=(specs, (seq, rows)),
                           check_vma=False)

    fused_backward = impl in ring.FUSED_BACKWARD

    def back(q, k, vv, rp, o, lse, do):
        me = lax.axis_index(axis_name)
        q, k, vv, o, do = as_stored(q, k, vv, o, do)
        if fused_backward:
            got = ring_fused_backward.backward(q, k, vv, o, lse, do, scale=scale, is_causal=is_causal,
                                               axis_name=axis_name, axis_size=P, checks=checks, plan=rp)
        else:
            got = ring_backward.backward(q, k, vv, o, lse, do, scale=scale, is_causal=is_causal, axis_name=axis_name,
                                         axis_size=P, checked=checked, u=after.u,
                                         inject=lambda x, step, site, axes: _inject(x, rp, me, step, site, axes))
        if not checked:
            return got
        grads, (ratios, steps) = got
        finite, detected = _global(jnp.all(jnp.isfinite(do)), [~(x <= 1.0) for x in ratios.values()], axis_name)
        return grads, ratios, steps[None], finite, detected

    grad_specs = (seq, seq, seq)
    names = spec_ring_fused_backward.CHECKS if fused_backward else spec_ring_backward.CHECKS
    back_specs = grad_specs if not checked else (
        grad_specs, {n: PS(axis_name) if n in spec_ring_fused_backward.GROUP_CHECKS else rows for n in names},
        PS(axis_name), PS(), PS())
    mapped_back = jax.shard_map(back, mesh=mesh, in_specs=(seq, seq, seq, PS(), seq, rows, seq),
                                out_specs=back_specs, check_vma=False)

    @jax.custom_vjp
    def core(q, k, vv, rp):
        return mapped(q, k, vv, rp)[0]

    def core_fwd(q, k, vv, rp):
        outs, (o, lse) = mapped(q, k, vv, rp)
        return outs, (q, k, vv, rp, o, lse)

    def core_bwd(saved, cts):
        q, k, vv, rp, o, lse = saved
        got = mapped_back(q, k, vv, rp, o, lse, cts[0])
        if checked:
            (dq, dk, dv), ratios, steps, finite, detected = got
            checks_ = {n: CheckResult(x.astype(F32), jnp.ones(x.shape, F32), ~(x <= 1.0)) for n, x in ratios.items()}
            report = Report(detected=detected, checks=checks_, inputs_finite=finite, located={},
                            corrected=jnp.zeros((), jnp.int32), ran=Ran(impl))
            counters.record(after.site, report, after.on_fault == "raise")
            if after.on_fault == "raise":  # a traced backward cannot raise: the warning and the count say why
                dq, dk, dv = (jnp.where(detected, jnp.asarray(jnp.nan, x.dtype), x) for x in (dq, dk, dv))
        else:
            dq, dk, dv = got
        return dq, dk, dv, jax.tree.map(_zero_cotangent, rp)

    core.defvjp(core_fwd, core_bwd)

    def run(q, k, vv, rp):
        o, blocks, ring_checks, steps, finite, detected = core(q, k, vv, rp)
        ordered = {c: blocks[c] for c in checks}
        report = Report(detected=detected, checks=ordered, inputs_finite=finite, located={},
                        corrected=jnp.zeros((), jnp.int32), ran=Ran(impl))
        return o, ring.RingReport(detected, report, {n: ring_checks[n] for n in ring.RING_CHECKS}, steps)

    return jax.jit(run)


__all__ = ["ring_attention", "ring_local"]
