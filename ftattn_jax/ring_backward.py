"""The backward of ring attention (``ftattn_jax.sharding``), by recomputation around the ring.

Each device keeps its query chunk, its part of the output (working precision) and the global
log-sum-exp of its rows (the forward's merged one), and passes its key and value chunk around the
ring again with ``lax.ppermute``, now with two accumulators beside it, ``dK`` and ``dV`` of that
chunk. At each step it recomputes the block's probabilities from the global log-sum-exp,
``P = exp(scale·QKᵀ − lse)``, adds its share

    dV_j += Pᵀ dO,   dS = P ∘ (dO Vⱼᵀ − D),   dQ += scale · dS Kⱼ,   dK_j += scale · dSᵀ Q

with ``D = rowsum(dO ∘ O)``, and passes chunk and accumulators on; one more ``ppermute`` returns
each chunk's accumulators to its device. Memory per step is one ``(B, N, Tc, Sc)`` block, as in
the forward, whatever computed the forward's blocks.

With ``checked``, every product is checked against a checksum and the softmax's row sums against 1
(``ftattn_spec.ring_backward``, as in ``ftattn_torch.ring_backward``); the accumulators travel
with their row sums, and the per-key verdicts with the chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from jax import lax

from ftattn_spec import ring as spec_ring
from ftattn_spec import ring_backward as rb


def _ratio(residual, threshold):
    """Residual over threshold; NaN where the threshold is not finite (fails every comparison)."""
    return jnp.where(jnp.isfinite(threshold), jnp.abs(residual) / threshold, jnp.nan)


def _worst(a, b):
    """Elementwise worse of two ratio arrays; NaN wins."""
    if a is None:
        return b
    return jnp.where(jnp.isnan(a) | jnp.isnan(b), jnp.nan, jnp.maximum(a, b))


def _bad(ratio):
    return jnp.any(~(ratio <= 1.0))


def _transit(dk, dv, carried, H: int, P: int):
    """``bwd_transit``, ``(B, S, K)``: the worse of dK's and dV's row sums against the checksums that
    travel with them (``carried``: Σₕ and Σₕ|·| of the contributions, for dK then dV)."""
    one = lambda acc, c, a: _ratio(acc.sum(-1) - c, rb.transit_threshold(H, P, a))  # noqa: E731
    return _worst(one(dk, *carried[:2]), one(dv, *carried[2:]))


def _carry(carried, dk_step, dv_step):
    """The travelling checksums with one step's contributions to dK and dV added."""
    return (carried[0] + dk_step.sum(-1), carried[1] + jnp.abs(dk_step).sum(-1),
            carried[2] + dv_step.sum(-1), carried[3] + jnp.abs(dv_step).sum(-1))


def _send(kr, vr, dk, dv, carried, kworst, *, step: int, P: int, axis_name, inject: Callable):
    """The end of step ``step``: the accumulators' faults injected as they leave (``inject(x, step,
    site, axes)``), then the chunk, its accumulators, their checksums and its keys' verdicts passed
    on to the next device; after the last step only the accumulators travel, once more, home."""
    dk = inject(dk, step, "bwd_dk_acc", (0, 2, 1, 3))  # local index (b, k, s, h)
    dv = inject(dv, step, "bwd_dv_acc", (0, 2, 1, 3))
    perm = [(i, (i + 1) % P) for i in range(P)]
    if step < P - 1:
        return lax.ppermute((kr, vr, dk, dv, carried, kworst), axis_name, perm)
    if P > 1:  # the accumulators here belong to device me + 1; ours are on device me − 1
        dk, dv, carried, kworst = lax.ppermute((dk, dv, carried, kworst), axis_name, perm)
    return kr, vr, dk, dv, carried, kworst


def backward(query, key, value, out, lse, grad_out, *, scale: float, is_causal: bool, axis_name, axis_size: int,
             checked: bool = False, inject: Callable | None = None, u: float = rb.unit("float32")):
    """``(dQ, dK, dV)`` of this device's chunks, in their dtypes (inside ``shard_map`` or a
    ``vmap`` over ``axis_name``); with ``checked`` also ``(ratios, steps)``: per check of
    ``rb.CHECKS`` the worst ratio over threshold (``(B, N, Tc)`` for this device's rows,
    ``(B, K, Sc)`` for its keys) and which of its steps flagged (bool ``(P,)``).

    query, out, grad_out: ``(B, Tc, N, H)``; key, value: ``(B, Sc, K, H)``; lse: ``(B, N, Tc)``,
    the forward's merged log-sum-exp (−inf on a row that attends to nothing). ``inject(x, step,
    site, axes_of_x)`` applies a ring plan's backward faults (None: no plan); ``u`` the unit
    roundoff of the products (``ftattn_spec.ring_backward.unit``).
    """
    P = axis_size
    me = lax.axis_index(axis_name)
    w = jnp.float64 if query.dtype == jnp.float64 else jnp.float32
    B, Tc, N, H = query.shape
    Sc, K = key.shape[1], key.shape[2]
    G = N // K
    inj = inject or (lambda x, step, site, axes: x)
    q, do = query.astype(w), grad_out.astype(w)
    live = jnp.isfinite(lse)
    lse = jnp.where(live, lse, 0.0).astype(w)
    d = jnp.einsum("btnh,btnh->bnt", do, out.astype(w))
    dq = jnp.zeros_like(q)
    kr, vr = key, value
    dk = jnp.zeros((B, Sc, K, H), w)
    dv = jnp.zeros_like(dk)
    diagonal = jnp.tril(jnp.ones((Tc, Sc), bool))
    fold = lambda x: x.reshape(B, Sc, K, G, *x.shape[3:]).sum(3)  # noqa: E731  B S N .. -> B S K ..
    # the travelling checksums of dK and dV (Σ_h and Σ_h |·| of the contributions, B S K) and the
    # worst per-key ratios of bwd_dk, bwd_dv, bwd_transit for the chunk's keys (3 B S K)
    carried = tuple(jnp.zeros((B, Sc, K), w) for _ in range(4))
    kworst = jnp.zeros((3, B, Sc, K), w)
    rows = {c: None for c in rb.ROW_CHECKS[:-1]}
    psum = jnp.zeros((B, N, Tc), w)
    mu, argerr = jnp.zeros_like(psum), jnp.zeros_like(psum)
    steps = [jnp.zeros((), bool) for _ in range(P)]
    q_abs, q_sum = jnp.abs(q).sum(-1), q.sum(-1)  # B Tc N
    do_abs, do_sum = jnp.abs(do).sum(-1), do.sum(-1)

    for r in range(P):
        j = (me - r) % P  # the device whose chunk is here
        if checked and r > 0:  # the accumulators as received
            t = _transit(dk, dv, carried, H, P)
            kworst = kworst.at[2].set(_worst(kworst[2], t))
            steps[r] = steps[r] | _bad(t)
        k, v = jnp.repeat(kr.astype(w), G, axis=2), jnp.repeat(vr.astype(w), G, axis=2)
        a = inj(jnp.einsum("btnh,bsnh->bnts", q, k), r, "bwd_scores", (0, 1, 2, 3))
        s = scale * a
        keep = live[..., None]
        if is_causal:  # blocks above the diagonal attend nothing, the diagonal block its lower triangle
            keep = keep & ((j < me) | ((j == me) & diagonal))
        p = inj(jnp.where(keep, jnp.exp(s - lse[..., None]), 0.0), r, "bwd_probs", (0, 1, 2, 3))
        dp = inj(jnp.einsum("btnh,bsnh->bnts", do, v), r, "bwd_dp", (0, 1, 2, 3))
        ds = inj(p * (dp - d[..., None]), r, "bwd_ds", (0, 1, 2, 3))
        g = inj(jnp.einsum("bnts,bsnh->btnh", ds, k), r, "bwd_dq", (0, 2, 1, 3))  # index (b, n, t, h)
        gk = inj(fold(jnp.einsum("bnts,btnh->bsnh", ds, q)), r, "bwd_dk", (0, 2, 1, 3))  # index (b, k, s, h)
        gv = inj(fold(jnp.einsum("bnts,btnh->bsnh", p, do)), r, "bwd_dv", (0, 2, 1, 3))
        if checked:
            k_abs = jnp.abs(k)
            tr = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  B Tc N <-> B N Tc
            new = {
                "bwd_qk_row": _ratio(a.sum(-1) - tr(jnp.einsum("btnh,bnh->btn", q, k.sum(1))),
                                     rb.product_threshold(H, Sc, tr(jnp.einsum("btnh,bnh->btn", jnp.abs(q),
                                                                               k_abs.sum(1))), u)),
                "bwd_dp_row": _ratio(dp.sum(-1) - tr(jnp.einsum("btnh,bnh->btn", do, v.sum(1))),
                                     rb.product_threshold(H, Sc, tr(jnp.einsum("btnh,bnh->btn", jnp.abs(do),
                                                                               jnp.abs(v).sum(1))), u)),
                "bwd_ds": _ratio(ds.sum(-1) - ((p * dp).sum(-1) - d * p.sum(-1)),
                                 rb.ds_threshold(Sc, (p * (jnp.abs(dp) + jnp.abs(d)[..., None])).sum(-1))),
                "bwd_dq": _ratio(tr(g.sum(-1)) - jnp.einsum("bnts,bsn->bnt", ds, k.sum(-1)),
                                 rb.product_threshold(Sc, H, jnp.einsum("bnts,bsn->bnt", jnp.abs(ds),
                                                                        k_abs.sum(-1)), u)),
            }
            for name, ratio in new.items():
                rows[name] = _worst(rows[name], ratio)
                steps[r] = steps[r] | _bad(ratio)
            psum = psum + p.sum(-1)
            mu = jnp.maximum(mu, jnp.where(keep, jnp.abs(s), 0.0).max(-1))
            argerr = jnp.maximum(argerr, rb.argument_error(H, scale, tr(q_abs), jnp.abs(kr.astype(w)).max(), u))
            kr_dk = _ratio(gk.sum(-1) - fold(jnp.einsum("bnts,btn->bsn", ds, q_sum)),
                           rb.product_threshold(Tc + G, H, fold(jnp.einsum("bnts,btn->bsn", jnp.abs(ds), q_abs)), u))
            kr_dv = _ratio(gv.sum(-1) - fold(jnp.einsum("bnts,btn->bsn", p, do_sum)),
                           rb.product_threshold(Tc + G, H, fold(jnp.einsum("bnts,btn->bsn", p, do_abs)), u))
            kworst = kworst.at[0].set(_worst(kworst[0], kr_dk)).at[1].set(_worst(kworst[1], kr_dv))
            steps[r] = steps[r] | _bad(kr_dk) | _bad(kr_dv)
            dk_step = scale * gk
            carried = _carry(carried, dk_step, gv)
        dq = dq + scale * g
        kr, vr, dk, dv, carried, kworst = _send(kr, vr, dk + scale * gk, dv + gv, carried, kworst, step=r, P=P,
                                                axis_name=axis_name, inject=inj)
    grads = dq.astype(query.dtype), dk.astype(key.dtype), dv.astype(value.dtype)
    if not checked:
        return grads
    # home: the accumulators against their checksums, and the softmax's row sums against 1
    t = _transit(dk, dv, carried, H, P)
    kworst = kworst.at[2].set(_worst(kworst[2], t))
    S = Sc * P
    lse_error = spec_ring.lse_threshold(S, mu) + P * spec_ring.weight_threshold(jnp.abs(lse))
    soft = _ratio(psum - live.astype(w), rb.softmax_threshold(S, argerr, mu, jnp.abs(lse), lse_error,
                                                              jnp.maximum(psum, 1.0)))
    steps[P - 1] = steps[P - 1] | _bad(t) | _bad(soft)
    zero = jnp.zeros((B, N, Tc), w)
    ratios = {**{n: zero if x is None else x for n, x in rows.items()}, "bwd_softmax": soft,
              **{n: jnp.swapaxes(x, 1, 2) for n, x in zip(rb.KEY_CHECKS, kworst)}}  # keys: B K Sc
    return grads, (ratios, jnp.stack(steps))


__all__ = ["backward"]
