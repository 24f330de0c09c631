"""Run by tests/test_sharding_jax.py in its own process, with 8 host devices (set before jax is
imported): ftattn_jax under jax.jit with inputs sharded over batch and heads. Prints one JSON object."""

from __future__ import annotations

import os
import re
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import ftattn_jax  # noqa: E402
from ftattn_spec import Fault  # noqa: E402

B, T, N, K, S, H = 4, 24, 8, 4, 40, 16  # every axis a different size but B and N, which the mesh splits
_SHAPE = re.compile(r"= [a-z0-9]+\[([0-9,]*)\][^ ]* all-gather(?:-start)?\(")


def largest_gather(compiled_text: str) -> int:
    """The most elements any all-gather of the compiled program produces (0: none)."""
    sizes = [int(np.prod([int(d) for d in m.group(1).split(",") if d] or [1]))
             for m in _SHAPE.finditer(compiled_text)]
    return max(sizes, default=0)


def schemes(mesh, rng, sh) -> dict:
    """The unfused path per scheme and the drop-in, sharded over batch and heads."""
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
    qs, ks, vs = (jax.device_put(x, sh) for x in (q, k, v))
    out = {}
    for scheme in ("baseline", "full", "abft_all"):
        f = jax.jit(lambda q, k, v, plan, s=scheme: ftattn_jax.attention(q, k, v, scheme=s, fault=plan,
                                                                           site=f"sharded {s}"))
        plan = Fault("probs", (3, 6, 5, 7), bit=30)
        o, r = f(qs, ks, vs, plan)
        o1, r1 = ftattn_jax.attention(q, k, v, scheme=scheme, fault=plan)
        f(qs, ks, vs, Fault("probs", (0, 1, 2, 3), bit=29))
        clean = jax.jit(lambda q, k, v, s=scheme: ftattn_jax.attention(q, k, v, scheme=s)[0])(qs, ks, vs)
        ref = np.asarray(ftattn_jax.attention(q, k, v, scheme=scheme)[0])
        out[scheme] = dict(
            out_spec=str(o.sharding.spec), clean_spec=str(clean.sharding.spec),
            clean_diff=float(np.max(np.abs(np.asarray(clean) - ref))),
            device=[d.id for d in ftattn_jax.monitor.devices_of(r, qs.sharding, q.shape)],
            expected=[int(mesh.devices[1, 3].id)],
            detected=bool(r.detected), single=bool(r1.detected),
            row_specs=sorted({str(c.flagged.sharding.spec) for c in r.checks.values() if c.flagged.ndim == 3}),
            compilations=f._cache_size(),
            largest_gather=largest_gather(f.lower(qs, ks, vs, plan).compile().as_text()))
    out["tally"] = {s: [t.calls, t.detected, None if t.first is None else [t.first.check, list(t.first.index)]]
                    for s, t in ftattn_jax.counters.tally().items() if s.startswith("sharded")}
    g = jax.jit(lambda q, k, v: ftattn_jax.dot_product_attention(q, k, v, is_causal=True))
    out["dropin"] = dict(out_spec=str(g(qs, ks, vs).sharding.spec),
                         largest_gather=largest_gather(g.lower(qs, ks, vs).compile().as_text()))
    return out


PARTS = {"schemes": schemes, "pallas": lambda mesh, rng, sh: fused(mesh, rng, sh),  # defined below
         "set_mesh": lambda mesh, rng, sh: under_set_mesh(rng)}


def main() -> None:
    """``python sharded_jax_worker.py PART``, PART one of ``PARTS`` (a test each, so that xdist's
    workers share them)."""
    part = sys.argv[1]
    if part not in PARTS:
        raise SystemExit(f"part must be one of {sorted(PARTS)}, got {part!r}")
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "heads"))
    sh = NamedSharding(mesh, P("data", None, "heads", None))
    out = {"devices": jax.device_count(), **PARTS[part](mesh, np.random.default_rng(0), sh)}
    json.dump(out, sys.stdout)


def under_set_mesh(rng) -> dict:
    """Under ``jax.set_mesh``, with the mesh's axes in explicit mode (``jax.make_mesh``'s default)
    and in auto mode, on all 8 devices and on 4 of them: the calls work (explicit mode refuses the
    implementations' gathers and selects unless they run in auto mode), equal one device's, keep
    their sharding, and count on the devices (a ``jax.Ref`` replicated over the mesh: no host
    callback in the program)."""
    from jax.sharding import AxisType

    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
    w = rng.standard_normal((B, T, N, H)).astype(np.float32)
    plan = Fault("probs", (3, 6, 5, 7), bit=30)
    _, r1 = ftattn_jax.attention(q, k, v, fault=plan)
    c1, _ = ftattn_jax.attention(q, k, v)
    d1 = ftattn_jax.dot_product_attention(q, k, v, is_causal=True)
    g1 = jax.grad(lambda q: (ftattn_jax.attention(q, k, v)[0] * w).sum())(q)
    f16 = [x.astype(np.float16) for x in (q, k, v)]
    p1, _ = ftattn_jax.attention(*f16, scheme="abft_all", implementation="pallas", fault=plan)
    got = {}
    for mode, devices in (("Explicit", 8), ("Auto", 8), ("Explicit", 4)):
        mesh = jax.make_mesh((2, devices // 2), ("data", "heads"), devices=jax.devices()[:devices],
                             axis_types=(getattr(AxisType, mode),) * 2)
        site = f"set_mesh {mode} {devices}"
        with jax.set_mesh(mesh):
            sh = NamedSharding(mesh, P("data", None, "heads", None))
            qs, ks, vs = (jax.device_put(x, sh) for x in (q, k, v))
            f = jax.jit(lambda q, k, v, plan: ftattn_jax.attention(q, k, v, fault=plan, site=site))
            o, r = f(qs, ks, vs, plan)
            clean = f(qs, ks, vs, None)[0]
            d = jax.jit(lambda q, k, v: ftattn_jax.dot_product_attention(q, k, v, is_causal=True, site=site))(
                qs, ks, vs)
            g = jax.jit(jax.grad(lambda q, k, v: (ftattn_jax.attention(q, k, v, site=site + " grad")[0] * w).sum()))(
                qs, ks, vs)
            eager_o, _ = ftattn_jax.attention(qs, ks, vs, site=site + " eager")
            _, eager_r = ftattn_jax.attention(qs, ks, vs, fault=plan, site=site + " eager")
            ps = [jax.device_put(x, sh) for x in f16]
            po, pr = jax.jit(lambda q, k, v: ftattn_jax.attention(q, k, v, scheme="abft_all", fault=plan,
                                                                   implementation="pallas", site=site + " pallas"))(*ps)
            callbacks = "callback" in str(jax.make_jaxpr(f)(qs, ks, vs, plan))
        flagged = lambda rep: sorted(map(tuple, np.argwhere(np.asarray(rep.checks["softmax_dmr"].flagged)).tolist()))  # noqa: E731
        spec = lambda x: str(P(*(tuple(x.sharding.spec) + (None,) * x.ndim)[:x.ndim]))  # noqa: E731  every axis
        got[site] = dict(
            out_spec=spec(o), grad_spec=spec(g), pallas_spec=spec(po), row_spec=spec(r.checks["softmax_dmr"].flagged),
            out_diff=float(np.max(np.abs(np.asarray(clean) - np.asarray(c1)))),
            dpa_diff=float(np.max(np.abs(np.asarray(d) - np.asarray(d1)))),
            grad_diff=float(np.max(np.abs(np.asarray(g) - np.asarray(g1)))),
            eager_diff=float(np.max(np.abs(np.asarray(eager_o) - np.asarray(c1)))),
            pallas_equal=bool(np.array_equal(np.asarray(po), np.asarray(p1), equal_nan=True)),
            flagged=[list(x) for x in flagged(r)], single=[list(x) for x in flagged(r1)],
            eager_detected=bool(eager_r.detected), pallas_detected=bool(pr.detected), callbacks=callbacks)
    got["tally"] = {s: [t.calls, t.detected] for s, t in ftattn_jax.counters.tally().items()
                    if s.startswith("set_mesh")}
    return got


def fused(mesh, rng, sh) -> dict:
    """The fused kernel (portable, interpreted) with float16 inputs sharded the same way: forward
    and backward run per (batch, head) block (``ftattn_jax.fused.partitioned``), a forward and a
    backward fault are found where they were put."""
    q, k, v = (jax.device_put(rng.standard_normal(s).astype(np.float16), sh)
               for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
    w = rng.standard_normal((B, T, N, H)).astype(np.float32)
    one = [np.asarray(x) for x in (q, k, v)]
    got = {}
    for scheme in ("full", "abft_all"):
        f = jax.jit(lambda q, k, v, plan, s=scheme: ftattn_jax.attention(
            q, k, v, scheme=s, fault=plan, implementation="pallas", site=f"fused {s}"))
        plan = Fault("probs", (3, 6, 5, 7), bit=30)
        o, r = f(q, k, v, plan)
        o1, r1 = ftattn_jax.attention(*one, scheme=scheme, fault=plan, implementation="pallas")
        flagged = {n: np.argwhere(np.asarray(c.flagged)).tolist() for n, c in r.checks.items()}
        got[scheme] = dict(out_spec=str(o.sharding.spec), equal=bool(np.array_equal(np.asarray(o), np.asarray(o1),
                                                                                     equal_nan=True)),
                           flagged=flagged, same=flagged == {n: np.argwhere(np.asarray(c.flagged)).tolist()
                                                             for n, c in r1.checks.items()},
                           row_specs=sorted({str(c.flagged.sharding.spec) for c in r.checks.values()}),
                           largest_gather=largest_gather(f.lower(q, k, v, plan).compile().as_text()))

    def loss(q, k, v, plan=None):
        return (ftattn_jax.attention(q, k, v, implementation="pallas", fault=plan, site="fused grad")[0]
                .astype(np.float32) * w).sum()

    g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    grads, grads1 = g(q, k, v), g(*one)
    got["grad"] = dict(specs=[str(x.sharding.spec) for x in grads],
                       diff=[float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
                             for a, b in zip(grads, grads1)],
                       scale=[float(np.max(np.abs(np.asarray(b, np.float32)))) for b in grads1],
                       largest_gather=largest_gather(g.lower(q, k, v).compile().as_text()))
    gf = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    gf(q, k, v, Fault("bwd_dk", (2, 3, 7, 5), bit=28))  # a kv head's dK, on the device holding heads 6 and 7
    got["tally"] = {s: [t.calls, t.detected] for s, t in ftattn_jax.counters.tally().items() if s.startswith("fused")}
    # vmap over a jitted call: the op's custom_vmap rule runs the kernel unpartitioned, per slice
    stack = [np.stack([x, x[:, ::-1]]) for x in one]
    f = jax.jit(lambda q, k, v: ftattn_jax.attention(q, k, v, implementation="pallas", is_causal=True)[0])
    vo = jax.vmap(f)(*stack)
    got["vmap_equal"] = all(bool(np.array_equal(np.asarray(vo[i]), np.asarray(f(*(x[i] for x in stack)))))
                            for i in range(2))
    return got


if __name__ == "__main__":
    main()
