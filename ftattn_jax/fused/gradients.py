"""The fused backward's verdict in JAX: judge the checks of :mod:`.pallas_backward`, hand the
verdict to the caller's counter, and apply the policy to the gradients.

A ``custom_vjp`` returns cotangents and nothing else, so the verdict cannot travel as an
output. It leaves the backward the way every forward call's does: through the ``record``
function the API layer hands in (``ftattn_jax.counters.record``, a ``jax.debug.callback``:
asynchronous, no host sync per call), under the call site's name plus ``" (backward)"``; and
through the gradients themselves under ``on_fault="nan"`` (and ``"raise"``, which a traced
backward cannot do: the implicated rows become NaN and a ``FaultWarning`` names the site).
docs/faults.md, "The backward's verdict", compares this with the alternatives (a cotangent
that carries the flags, ``checkify``).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from ftattn_spec import tolerances as tol
from ftattn_spec.report import Report

from ..common import verdict
from . import pallas_backward as pb
from . import partitioned

F32 = jnp.float32


def _group(got: pb.BackwardOutput, lse, cfg: pb.BackwardConfig):
    """``bwd_softmax_kv`` per (batch, query head): the dK/dV kernel's total of P over every key
    against the attended rows, with twice the rows' thresholds (the same terms in another
    order) plus the reordering of P's total (as in PyTorch)."""
    total = got.cols.sum(-1)  # B N
    attended = jnp.sum(jnp.isfinite(lse), axis=-1).astype(F32)
    soft = got.rows[2 * pb.ROW_CHECKS.index("bwd_softmax") + 1].sum(-1)
    order = tol.gamma(cfg.block_m * cfg.block_n) + tol.gamma(-(-cfg.S // cfg.block_n) + 1) + tol.gamma(cfg.T + 1)
    return (verdict(jnp.abs(total - attended), 2.0 * soft + order * attended, "vector", signed=False),)


def _reduce_to(ds, bias):
    """dS ``(B, N, T, S)`` summed over the axes ``bias`` broadcasts along, in ``bias``'s shape and dtype."""
    shape = tuple(bias.shape)
    full = (1,) * (4 - len(shape)) + shape
    axes = tuple(i for i in range(4) if full[i] == 1 and ds.shape[i] != 1)
    return ds.sum(axis=axes, keepdims=True).reshape(shape).astype(bias.dtype)


def _uniform_dv(lse, do, masks, S: int, G: int):
    """Under jax.nn's rule a live row that attends nothing outputs the mean of every value row:
    its dO reaches each value row as dO/S. ``(B, 1, K, H)``, to add to dV."""
    B, T, N, H = do.shape
    live = jnp.arange(T)[None, :] < (T if masks.query_lengths is None else masks.query_lengths[:, None])
    filled = (lse == jnp.inf) & live[:, None, :]  # B N T
    g = jnp.einsum("bnt,btnh->bnh", filled.astype(F32), do.astype(F32)) / S
    return g.reshape(B, N // G, G, H).sum(2)[:, None]


def checked(q, k, v, out, lse, do, ft, fv, cfg: pb.BackwardConfig, masks, grad, uniform: bool):
    """``(dq, dk, dv, dbias)`` of one call, from the fused backward with its checks (when
    ``cfg.checks``) and ``grad``'s policy (``runner.BackwardSettings``)."""
    def run(c, t, u):
        rows, keys = (("bnt",) * (2 * len(pb.ROW_CHECKS)), ("bns",) * (2 * len(pb.KEY_CHECKS))) if c.checks \
            else (None, None)
        template = pb.BackwardOutput("btnh", "bskh", "bskh", "bnts" if c.has_bias else None, rows, keys,
                                     "bns" if c.checks else None)
        return partitioned.backward(pb.launch, q, k, v, out, lse, do, t, u, c, masks, template)
    got = run(cfg, ft, fv)
    dq, dk, dv, ds = got.dq, got.dk, got.dv, got.ds
    if cfg.checks:
        rows = [verdict(got.rows[2 * i], got.rows[2 * i + 1], "vector", signed=False)
                for i in range(len(pb.ROW_CHECKS))]
        keys = [verdict(got.keys[2 * i], got.keys[2 * i + 1], "vector", signed=False)
                for i in range(len(pb.KEY_CHECKS))]
        group = _group(got, lse, cfg)
        detected = jnp.zeros((), bool)
        for r in (*rows, *keys, *group):
            detected = detected | jnp.any(r.flagged)
        if grad.record is not None:  # a report of the backward's checks: the counters locate the first flag
            named = {**dict(zip(pb.ROW_CHECKS, rows)), **dict(zip(pb.KEY_CHECKS, keys)), "bwd_softmax_kv": group[0]}
            report = Report(detected=detected, checks=named, inputs_finite=jnp.ones((), bool), located={},
                            corrected=jnp.zeros((), jnp.int32))
            grad.record(grad.site, report, grad.warn or grad.on_fault == "raise")
        if grad.on_fault == "correct":  # again, without the plan's (transient) faults
            clean = dataclasses.replace(cfg, n_faults=0, checks=False)
            dq, dk, dv, ds = lax.cond(detected, lambda: tuple(run(clean, None, None)[:4]),
                                      lambda: (dq, dk, dv, ds))
        elif grad.on_fault in ("nan", "raise"):  # poison the gradient rows the flagged checks implicate
            B, T, N, H = q.shape
            S, K = k.shape[1], k.shape[2]
            row = jnp.zeros((B, N, T), bool)
            for r in rows:
                row = row | r.flagged
            key = jnp.zeros((B, N, S), bool)
            for r in keys:
                key = key | r.flagged
            head = group[0].flagged  # B N: that head's whole dK, dV
            key = key | head[..., None]
            key = key.reshape(B, K, N // K, S).any(2).transpose(0, 2, 1)[..., None]  # B S K 1
            nan = jnp.asarray(jnp.nan, dq.dtype)
            dq = jnp.where(row.transpose(0, 2, 1)[..., None], nan, dq)
            dk, dv = jnp.where(key, nan, dk), jnp.where(key, nan, dv)
    if uniform:
        dv = (dv.astype(F32) + _uniform_dv(lse, do, masks, cfg.S, cfg.G)).astype(dv.dtype)
    dbias = None if masks.bias is None else _reduce_to(ds, masks.bias)
    return dq, dk, dv, dbias
