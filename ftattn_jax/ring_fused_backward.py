"""The backward of ring attention by the fused Pallas kernels, checked (``ftattn_jax.sharding``,
after a ring of fused blocks): each step's block is one launch of the portable kernels' backward
(:func:`ftattn_jax.fused.runner.block_backward`), given the forward's merged log-sum-exp, so P
is recomputed tile by tile and never stored (memory O(B·N·Tc) beyond the chunks and gradients,
where :mod:`.ring_backward` holds one ``(B, N, Tc, Sc)`` block per step).

The key and value chunk travels around the ring with ``lax.ppermute`` as in :mod:`.ring_backward`,
with its float32 accumulators ``dK``, ``dV``, their travelling row sums (``bwd_transit``) and its
keys' worst ratios. Each launch judges its own products; ``bwd_softmax`` (each row's Σ p over
the steps) and ``bwd_softmax_kv`` (the dK/dV kernel's totals of P per kv head over the steps) are
judged after the last step (``ftattn_spec.ring_fused_backward``, as in PyTorch's
``ftattn_torch.ring_fused_backward``).

Faults of a ring plan at the kernels' sites (``bwd_scores`` … ``bwd_dv``) are injected by the
kernel of their step; the accumulators' (``bwd_dk_acc``, ``bwd_dv_acc``) here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from ftattn_spec import faults as spec_faults
from ftattn_spec import ring_fused_backward as spec

from . import fused
from .common import F32
from .ring_backward import _bad, _carry, _ratio, _send, _transit, _worst
from .ring_faults import core_plan, inject

_SOFT = spec.ROW_CHECKS.index("bwd_softmax")


def _skipped(got: fused.runner.backward.BackwardOutput):
    """A block above the causal diagonal: no gradient, and every check's residual 0 against 1."""
    zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), got)
    if got.rows is None:
        return zero
    ones = lambda xs: tuple(jnp.ones(x.shape, x.dtype) if i % 2 else x for i, x in enumerate(xs))  # noqa: E731
    return zero._replace(rows=ones(zero.rows), keys=ones(zero.keys))


def backward(query, key, value, out, lse, grad_out, *, scale: float, is_causal: bool, axis_name, axis_size: int,
             checks: tuple[str, ...], plan=None):
    """``(dQ, dK, dV)`` of this device's chunks in their dtypes (inside ``shard_map`` over
    ``axis_name``), and with ``checks`` (the forward's row checks; empty: none) also
    ``(ratios, steps)``: per check of ``ftattn_spec.ring_fused_backward.CHECKS`` the worst ratio
    over threshold (``(B, N, Tc)`` for this device's rows, ``(B, K, Sc)`` for its keys, ``(1, B, K)``
    for ``bwd_softmax_kv``) and which of its steps flagged (bool ``(P,)``).

    query, grad_out: ``(B, Tc, N, H)`` (float16 or bfloat16); out: the forward's merged output
    of the rows (float32); key, value: ``(B, Sc, K, H)``; lse: ``(B, N, Tc)``, the merged
    log-sum-exp (base e, −inf on a row that attends nothing); ``plan``: a ``RingPlan`` of arrays.
    """
    P = axis_size
    me = lax.axis_index(axis_name)
    B, Tc, N, H = query.shape
    Sc, K = key.shape[1], key.shape[2]
    G = N // K
    checked = bool(checks)
    live = jnp.isfinite(lse)
    lse2 = jnp.where(live, lse.astype(F32) * (1.0 / math.log(2.0)), jnp.inf)
    dq = jnp.zeros((B, Tc, N, H), F32)
    kr, vr = key, value
    dk = jnp.zeros((B, Sc, K, H), F32)
    dv = jnp.zeros_like(dk)
    carried = tuple(jnp.zeros((B, Sc, K), F32) for _ in range(4))  # Σ_h, Σ_h |·| of dK's, dV's contributions
    kworst = jnp.zeros((len(spec.KEY_CHECKS), B, K, Sc), F32)
    rows = {c: None for c in spec.ROW_CHECKS if c != "bwd_softmax"}
    psum = jnp.zeros((B, N, Tc), F32)
    p_group = jnp.zeros((B, K), F32)
    steps = [jnp.zeros((), bool) for _ in range(P)]
    tr = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  B Sc K <-> B K Sc
    worst_of_group = lambda x: jnp.max(x.reshape(B, K, G, Sc), axis=2)  # noqa: E731  B N Sc -> B K Sc (NaN wins)

    cfg = None
    for r in range(P):
        if checked and r > 0:  # the accumulators as received
            t = tr(_transit(dk, dv, carried, H, P))
            kworst = kworst.at[-1].set(_worst(kworst[-1], t))
            steps[r] = steps[r] | _bad(t)
        pl_r = core_plan(plan, me, r, spec_faults.BACKWARD_SITES)
        args = (query, kr, vr, out, lse2, grad_out, pl_r)

        def launch(causal: bool):
            c = fused.runner.ring_backward_config(query, kr, pl_r, checks=checks, scale=scale, is_causal=causal)
            return c, lambda *a: fused.runner.block_backward(*a, c)
        cfg, full = launch(False)
        if is_causal:  # blocks below the diagonal attend everything, the diagonal its lower triangle
            _, diag = launch(True)
            j = (me - r) % P
            skip = lambda *a: _skipped(jax.eval_shape(full, *a))  # noqa: E731
            got = lax.switch(jnp.where(j < me, 0, jnp.where(j == me, 1, 2)), (full, diag, skip), *args)
        else:
            got = full(*args)
        if checked:
            for i, name in enumerate(spec.ROW_CHECKS):
                if i == _SOFT:
                    psum = psum + got.rows[2 * i]
                    continue
                ratio = _ratio(got.rows[2 * i], got.rows[2 * i + 1])
                rows[name] = _worst(rows[name], ratio)
                steps[r] = steps[r] | _bad(ratio)
            for i in range(len(spec.KERNEL_KEY_CHECKS)):
                ratio = worst_of_group(_ratio(got.keys[2 * i], got.keys[2 * i + 1]))
                kworst = kworst.at[i].set(_worst(kworst[i], ratio))
                steps[r] = steps[r] | _bad(ratio)
            p_group = p_group + got.cols.sum(-1).reshape(B, K, G).sum(-1)
            carried = _carry(carried, got.dk, got.dv)
        dq = dq + got.dq
        kr, vr, dk, dv, carried, kworst = _send(
            kr, vr, dk + got.dk, dv + got.dv, carried, kworst, step=r, P=P, axis_name=axis_name,
            inject=lambda x, step, site, axes: inject(x, plan, me, step, site, axes))
    grads = dq.astype(query.dtype), dk.astype(key.dtype), dv.astype(value.dtype)
    if not checked:
        return grads
    # home: the accumulators against their checksums, the softmax's sums over the steps
    t = tr(_transit(dk, dv, carried, H, P))
    kworst = kworst.at[-1].set(_worst(kworst[-1], t))
    thr = spec.softmax_threshold(Sc * P, P, H, jnp.dtype(query.dtype).name, cfg.block_m, cfg.block_n,
                                 cfg.forward_block_n, jnp.where(live, lse2, 0.0), psum)
    soft = _ratio(psum - live.astype(F32), thr)
    attended = live.reshape(B, K, G * Tc).sum(-1).astype(F32)
    group = _ratio(p_group - attended, spec.group_threshold(thr.reshape(B, K, G * Tc).sum(-1), attended, Tc=Tc,
                                                            Sc=Sc, P=P, G=G, block_m=cfg.block_m, block_n=cfg.block_n))
    steps[P - 1] = steps[P - 1] | _bad(t) | _bad(soft) | _bad(group)
    ratios = {**rows, "bwd_softmax": soft, **dict(zip(spec.KEY_CHECKS, kworst)), "bwd_softmax_kv": group[None]}
    return grads, ({n: ratios[n] for n in spec.CHECKS}, jnp.stack(steps))


__all__ = ["backward"]
