"""``DTensor`` inputs: one call over a device mesh, batch and heads split across it.

``ftattn_torch.attention`` and the SDPA drop-in accept ``torch.distributed.tensor.DTensor``
query, key and value (layout ``(B, N, T, H)`` and ``(B, K, S, H)``) placed alike:
per mesh dimension ``Replicate()``, ``Shard(0)`` (batch) or ``Shard(1)`` (heads; the kv heads
split with them, so query head ``n`` still reads kv head ``n // G``). Each rank runs the call on
its own block (``to_local``, differentiable), with the fault plan's global indices moved into
the block; the output is a ``DTensor`` placed as the query, and so are the report's per-(batch,
head) fields, while ``detected`` and ``inputs_finite`` are reduced over the mesh (one
all-reduce each), so every rank holds the global verdict. Each rank's counters count its own
block's call, located at global batch and head indices.

A sequence split (``Shard(2)``: use ``ftattn_torch.distributed.ring_attention``), a split head
dim, ``Partial`` and uneven splits are refused with a ``ValueError`` naming the argument.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

from ftattn_spec.faults import Fault, FaultDetected
from ftattn_spec.report import CheckResult, Report

from . import counters

try:  # torch built without distributed support has no DTensor
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = None


def any_dtensor(*xs) -> bool:
    """Whether any of ``xs`` is a ``DTensor``."""
    return DTensor is not None and any(isinstance(x, DTensor) for x in xs)


class Split(NamedTuple):
    """How a call's blocks lie on the mesh: ``mesh``, the query's ``placements``, the mesh dim
    splitting batch and the one splitting heads (None: not split), and this rank's block."""

    mesh: object
    placements: tuple
    batch_dim: int | None
    head_dim: int | None
    #: this rank's first batch, query head and kv head, the local B, N, K, and the global ones
    start: tuple[int, int, int]
    local: tuple[int, int, int]
    sizes: tuple[int, int, int]


def _split(query, key, value) -> Split:
    names = ("query", "key", "value")
    for name, x in zip(names, (query, key, value)):
        if not isinstance(x, DTensor):
            raise TypeError(f"{name}: expected a DTensor like query (a DTensor query, key or value needs all "
                            f"three), got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name}: expected a 4-dimensional DTensor (B, N, T, H) or (B, K, S, H), got shape "
                             f"{tuple(x.shape)}")
    mesh, placements = query.device_mesh, tuple(query.placements)
    for name, x in zip(names[1:], (key, value)):
        if x.device_mesh != mesh or tuple(x.placements) != placements:
            raise ValueError(f"{name}: expected the query's mesh and placements {placements}, got "
                             f"{tuple(x.placements)}")
    dims = {0: None, 1: None}
    for d, p in enumerate(placements):
        if isinstance(p, Replicate):
            continue
        if not isinstance(p, Shard) or p.dim not in (0, 1):
            raise ValueError(f"query: expected placements Replicate(), Shard(0) (batch) or Shard(1) (heads) on "
                             f"each mesh dim, got {p} on mesh dim {d} (split the sequence with "
                             f"ftattn_torch.distributed.ring_attention)")
        if dims[p.dim] is not None:
            raise ValueError(f"query: expected at most one mesh dim splitting tensor dim {p.dim}, got "
                             f"{placements}")
        dims[p.dim] = d
    B, N = query.shape[:2]
    K = key.shape[1]
    coord = mesh.get_coordinate() or [0] * mesh.ndim
    start, local = [0, 0, 0], [B, N, K]
    for i, (size_name, sizes) in enumerate((("B", (B,)), ("N and K", (N, K)))):
        d = dims[i]
        if d is None:
            continue
        P = mesh.size(d)
        if any(n % P for n in sizes):
            raise ValueError(f"query: expected {size_name} divisible by the {P} ranks of mesh dim {d} that split "
                             f"them, got {sizes}")
        for j, n in enumerate(sizes):
            k = i + j  # 0: batch, 1: query heads, 2: kv heads
            local[k] = n // P
            start[k] = coord[d] * (n // P)
    return Split(mesh, placements, dims[0], dims[1], tuple(start), tuple(local), (B, N, K))


def _local_extra(name: str, x, sp: Split):
    """A mask, bias or length tensor on this rank: a DTensor placed as the query, its local part; a
    plain tensor, its slice of this rank's batch and heads where it is not broadcast there."""
    if x is None:
        return None
    if DTensor is not None and isinstance(x, DTensor):
        if x.device_mesh != sp.mesh or tuple(x.placements) != sp.placements:
            raise ValueError(f"{name}: expected a plain tensor or a DTensor placed as the query "
                             f"({sp.placements}), got {tuple(x.placements)}")
        return x.to_local()
    lead = 4 - x.ndim if name not in ("query_seq_lengths", "key_value_seq_lengths") else 0
    for dim, (s, n) in enumerate(zip(sp.start[:2], sp.local[:2])):
        axis = dim - lead
        if axis < 0 or axis >= x.ndim or x.shape[axis] == 1 or (dim == 0 and sp.batch_dim is None) \
                or (dim == 1 and sp.head_dim is None):
            continue
        x = x.narrow(axis, s, n)
    return x


def _local_fault(fault, sp: Split):
    """The faults that fall in this rank's block, their batch and head indices made local."""
    if fault is None:
        return None
    faults = [fault] if isinstance(fault, Fault) else list(fault)
    mine = []
    for f in faults:
        if not isinstance(f, Fault):
            return fault  # not faults: the local call's validation names the argument
        kv = f.site in ("key", "value", "bwd_dk", "bwd_dv")
        idx = list(f.index)
        inside = True
        for dim, k in ((0, 0), (1, 2 if kv else 1)):
            if idx[dim] is None:
                continue
            if not 0 <= idx[dim] < sp.sizes[k]:  # out of the call: every rank would drop it silently
                raise ValueError(f"fault.index: expected {'batch' if dim == 0 else 'head'} index "
                                 f"0 <= i < {sp.sizes[k]} at site {f.site!r}, got {f.index}")
            if not sp.start[k] <= idx[dim] < sp.start[k] + sp.local[k]:
                inside = False
            idx[dim] -= sp.start[k]
        if inside:
            mine.append(dataclasses.replace(f, index=tuple(idx)))
    return mine or None


def _reduce(x, op, sp: Split):
    """``x`` (a scalar tensor) reduced with ``op`` over every mesh dim."""
    y = torch.as_tensor(x).to(torch.int32).reshape(1).clone()
    for d in range(sp.mesh.ndim):
        dist.all_reduce(y, op=op, group=sp.mesh.get_group(d))
    return y[0]


def _join(sp: Split, out, report: Report):
    def dt(x):
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            return x
        shape = list(x.shape)
        for dim, d in ((0, sp.batch_dim), (1, sp.head_dim)):
            if d is not None:
                shape[dim] *= sp.mesh.size(d)
        return DTensor.from_local(x.contiguous(), sp.mesh, sp.placements, run_check=False, shape=tuple(shape),
                                  stride=torch.empty(shape, device="meta").stride())

    checks = {n: CheckResult(*(dt(t) for t in c)) for n, c in report.checks.items()}
    report = report._replace(
        detected=_reduce(report.detected, dist.ReduceOp.MAX, sp).to(torch.bool),
        inputs_finite=_reduce(report.inputs_finite, dist.ReduceOp.MIN, sp).to(torch.bool),
        corrected=_reduce(report.corrected, dist.ReduceOp.SUM, sp),
        checks=checks, located={n: dt(t) for n, t in report.located.items()})
    return dt(out), report


def run(fn: Callable, query, key, value, *, extras: dict, fault, raise_on_fault: bool):
    """``fn(query, key, value, fault=..., **extras)`` (returning ``(out, report)``, never raising
    on a fault) on this rank's block of DTensor inputs; the output and report as DTensors over the
    mesh, the verdict global. ``raise_on_fault``: raise ``FaultDetected`` on every rank when any
    rank detected (a rank raising alone would leave the others waiting in the next collective)."""
    sp = _split(query, key, value)
    local = {n: _local_extra(n, x, sp) for n, x in extras.items()}
    with counters.index_offset(sp.start[0], sp.start[1]):
        out, report = fn(query.to_local(), key.to_local(), value.to_local(), fault=_local_fault(fault, sp), **local)
    out, report = _join(sp, out, report)
    if raise_on_fault and bool(report.detected):
        raise FaultDetected(report)
    return out, report
