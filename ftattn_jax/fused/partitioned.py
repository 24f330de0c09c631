"""The fused kernels under ``jax.jit`` with inputs sharded over batch and heads.

A ``pallas_call`` has no partitioning rule: left alone, XLA gathers its inputs onto every device
and each device computes the whole attention (measured on 8 host devices: 39 all-gathers of the
inputs, the output replicated). :func:`forward` and :func:`backward` wrap the kernels' launches in
``custom_partitioning`` ops whose rule says what attention is: independent over batch ``b`` and
heads (``(k g)``: the kv head and the query heads it serves), with the sequences, head dim and
group kept whole. Each device then runs the kernels on its own ``(b, heads)`` block, and every
output keeps that sharding.

The fault table holds global ``(b, n)`` indices: each shard subtracts the first global batch and
head it holds (read from sharded ``arange``s, so no collective is needed) and drops the faults that
are not its own. The forward's ``kv_finite`` scalar comes back per ``(b, k)`` block and is reduced
outside.

Only where it matters: a process with more than one device, outside a visible ``vmap`` and outside
a manual mesh (``shard_map``); everywhere else the kernel is called directly. A ``vmap`` applied to
a jitted program that holds the op (invisible when the op is traced) reaches its ``custom_vmap``
rule, which runs the kernels unpartitioned.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as PS

from ftattn_spec import faults as spec_faults

from ..common import manual_mesh, trace_kinds
from . import compat
from .side_inputs import KernelOutput, stat_planes

#: the mask arrays, in the order of the kernels' ``Masks``
_MASKS = ("mask", "bias", "query_lengths", "key_lengths")
#: layout letters: b batch, n query heads, k kv heads, t and s the sequences, h head dim (u: a
#: broadcast axis of size 1, r: a fault table's; both kept whole)
_FACTOR = {"b": "b", "n": "(k g)", "k": "k", "t": "t", "s": "s", "h": "h"}
_WHOLE = ("t", "s", "h", "g")
#: the fault sites whose index names a kv head (``ftattn_spec.faults.SITE_AXES``)
_KV_SITES = tuple(i for i, name in enumerate(spec_faults.SITES) if spec_faults.SITE_AXES[name][1] == "K")


def may_partition() -> bool:
    """Whether a launch here may see sharded inputs that a ``custom_partitioning`` op can keep
    sharded: more than one device, no ``vmap`` (the op has no batching rule) and no manual mesh."""
    if jax.device_count() == 1 or manual_mesh():
        return False
    kinds = trace_kinds()
    return kinds is not None and "BatchTrace" not in kinds


def forward(kernel: Callable, q, k, v, ft, fv, cfg, masks):
    """``kernel(q, k, v, ft, fv, cfg, masks)`` (a forward kernel module's ``launch``, returning a
    ``KernelOutput``), partitioned over batch and heads where the inputs may be sharded."""
    if not may_partition():
        return kernel(q, k, v, ft, fv, cfg, masks)
    lse = bool(getattr(cfg, "lse", False))
    template = KernelOutput("btnh", "bnt", ("bnt",) * stat_planes(cfg), "bk", "bnt" if lse else None)

    def per_shard(q, k, v, ft, fv, masks):
        got = kernel(q, k, v, ft, fv, cfg, masks)
        return got._replace(kv_finite=jnp.broadcast_to(got.kv_finite, (q.shape[0], k.shape[2])))

    got = _run(per_shard, (cfg, kernel), (q, k, v), ("btnh", "bskh", "bskh"), ft, fv, masks, template)
    return got._replace(kv_finite=jnp.all(got.kv_finite))


def backward(kernel: Callable, q, k, v, o, lse, do, ft, fv, cfg, masks, template):
    """``kernel(q, k, v, o, lse, do, ft, fv, cfg, masks)`` (the fused backward's launch),
    partitioned over batch and heads where the inputs may be sharded; ``template`` is its result
    with each array replaced by its layout (letters of ``b n k t s h``; None where absent)."""
    if not may_partition():
        return kernel(q, k, v, o, lse, do, ft, fv, cfg, masks)

    def per_shard(q, k, v, o, lse, do, ft, fv, masks):
        return kernel(q, k, v, o, lse, do, ft, fv, cfg, masks)

    return _run(per_shard, (cfg, kernel), (q, k, v, o, lse, do), ("btnh", "bskh", "bskh", "btnh", "bnt", "btnh"),
                ft, fv, masks, template)


_OPS: dict = {}


def _run(per_shard, key, arrays, layouts, ft, fv, masks, template):
    B, N = arrays[0].shape[0], arrays[0].shape[2]
    K = arrays[1].shape[2]
    given = tuple((name, tuple(x.shape)) for name, x in zip(_MASKS, masks) if x is not None)
    mask_layouts = tuple("b" if name in ("query_lengths", "key_lengths") else
                         ("b" if shape[0] == B else "u") + ("n" if shape[1] == N else "u") + "ts"
                         for name, shape in given)
    faults = ft is not None
    layouts = (*layouts, "b", "n", *(("r", "r") if faults else ()), *mask_layouts)
    outs = tuple(jax.tree.leaves(template))
    full_key = (key, layouts, outs, type(masks), tuple(n for n, _ in given), faults, (B, N, K))
    op = _OPS.get(full_key)
    if op is None:
        op = _OPS[full_key] = _op(per_shard, layouts, outs, type(masks), tuple(n for n, _ in given), faults,
                                  len(arrays), (B, N, K))
    extra = [jnp.arange(B, dtype=jnp.int32), jnp.arange(N, dtype=jnp.int32), *((ft, fv) if faults else ())]
    flat = op(*arrays, *extra, *(x for x in masks if x is not None))
    return jax.tree.unflatten(jax.tree.structure(template), flat)


def _rule(layouts, outs, G: int) -> tuple[str, tuple[str, ...]]:
    """The Shardy rule of the layouts, and its need-replication factors in factor order (a query
    head is ``(k g)``, or ``k`` when each kv head serves one: Shardy refuses a factor of size 1 in a
    compound)."""
    names = {**_FACTOR, "n": "(k g)" if G > 1 else "k"}

    def factors(i: int, layout: str) -> str:
        return " ".join(names.get(c, f"{c}{i}x{j}") for j, c in enumerate(layout))
    ins = [factors(i, x) for i, x in enumerate(layouts)]
    res = [factors(100 + i, x) for i, x in enumerate(outs)]
    rule = ", ".join(ins) + " -> " + ", ".join(res)
    # Shardy numbers the factors in order of first appearance and wants its lists in that order
    seen = list(dict.fromkeys(rule.replace("(", " ").replace(")", " ").replace(",", " ").replace("->", " ").split()))
    return rule, tuple(f for f in seen if f in _WHOLE or f.startswith(("r", "u")))


def _spec(layout: str, b, n):
    return PS(*(b if c == "b" else n if c in "nk" else None for c in layout))


def _axes(spec, size: int, mesh):
    """``spec`` (a PartitionSpec entry) if the product of its mesh axes divides ``size``, else None."""
    if spec is None:
        return None
    count = 1
    for a in (spec if isinstance(spec, tuple) else (spec,)):
        count *= mesh.shape[a]
    return spec if size % count == 0 else None


def _shardings(mesh, q_sharding, layouts, outs, dims):
    """Every argument's and result's ``NamedSharding``, from the query's: batch and heads as the
    query has them (heads only where the kv heads divide evenly), everything else whole."""
    B, N, K = dims
    spec = compat.spec_of(q_sharding, mesh, 4) or (None,) * 4
    b = _axes(spec[0], B, mesh)
    n = _axes(spec[2], K, mesh) if _axes(spec[2], N, mesh) is not None else None
    return (tuple(NamedSharding(mesh, _spec(x, b, n)) for x in layouts),
            tuple(NamedSharding(mesh, _spec(x, b, n)) for x in outs))


def _op(per_shard, layouts, outs, masks_type, mask_names, faults: bool, n_arrays: int, dims):
    """The ``custom_partitioning`` op of one kernel configuration."""
    B, N, K = dims

    def per_device(*args):
        arrays, (bidx, nidx) = args[:n_arrays], args[n_arrays:n_arrays + 2]
        rest = list(args[n_arrays + 2:])
        ft, fv = (rest.pop(0), rest.pop(0)) if faults else (None, None)
        if faults:  # global (b, head) of the plan to this shard's, and faults elsewhere dropped
            rows = ft.reshape(-1, 8)
            fb, fn = rows[:, 2], rows[:, 3]
            kv = jnp.zeros(rows.shape[:1], bool)  # indexed by kv head (no array constant: the op takes none)
            for code in _KV_SITES:
                kv = kv | (rows[:, 0] == code)
            G = N // K
            lb = fb - bidx[0]
            ln = jnp.where(kv, fn - nidx[0] // G, fn - nidx[0])
            heads = jnp.where(kv, nidx.shape[0] // G, nidx.shape[0])
            mine = (((fb == -1) | ((lb >= 0) & (lb < bidx.shape[0])))
                    & ((fn == -1) | ((ln >= 0) & (ln < heads))))
            rows = rows.at[:, 2].set(jnp.where(fb == -1, -1, lb)).at[:, 3].set(jnp.where(fn == -1, -1, ln))
            ft = rows.at[:, 0].set(jnp.where(mine, rows[:, 0], -1)).reshape(-1)
        present = dict(zip(mask_names, rest))
        masks = masks_type(*(present.get(name) for name in _MASKS))
        return tuple(jax.tree.leaves(per_shard(*arrays, ft, fv, masks)))

    op = custom_partitioning(per_device)

    def infer(mesh, arg_shapes, result_shape):
        return _shardings(mesh, arg_shapes[0].sharding, layouts, outs, dims)[1]

    def partition(mesh, arg_shapes, result_shape):
        args, results = _shardings(mesh, arg_shapes[0].sharding, layouts, outs, dims)
        return mesh, per_device, results, args

    rule, whole = _rule(layouts, outs, N // K)
    # decode_shardings=False: a sub-axis split (kv heads fewer than a mesh axis) cannot be read as
    # a PartitionSpec, and JAX would fail decoding it; compat.spec_of reads what it can
    op.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule, decode_shardings=False,
                     need_replication_factors=whole, **({"g": N // K} if N > K else {}))
    # custom_partitioning has no batching rule, and a vmap outside a jit only batches the traced
    # program afterwards: under vmap, the kernels run unpartitioned with Pallas' own batching
    batchable = custom_vmap(lambda *args: op(*args))

    @batchable.def_vmap
    def _batched(axis_size, in_batched, *args):
        axes = [0 if b else None for b in in_batched]
        return jax.vmap(per_device, in_axes=axes)(*args), (True,) * len(outs)

    return batchable


__all__ = ["backward", "forward", "may_partition"]
