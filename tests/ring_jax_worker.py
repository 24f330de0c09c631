"""Run by tests/test_ring_jax.py in its own process, with 4 host devices (set before jax is imported):
``ftattn_jax.sharding.ring_attention`` over a mesh axis of 4. Prints one JSON object."""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as PS  # noqa: E402

import ftattn_jax  # noqa: E402
from ftattn_jax import sharding  # noqa: E402
from ftattn_spec.ring import RingFault  # noqa: E402
from ring_cases import BACKWARD_CASES, CASES, FUSED_BACKWARD_CASES, FUSED_CASES, refusals  # noqa: E402  (this folder is on sys.path)

P = 4
B, N, K, H = 2, 6, 3, 8
T, S = 12, 20  # chunks of 3 queries and 5 keys; causal runs use T = S = 20
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def reference64(q, k, v, causal):
    """Float64 attention in NumPy (grouped-query: head n reads kv head n // (N // K))."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    G = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def inputs(rng, t, s, dtype, scale=1.0):
    make = lambda shape: jnp.asarray(rng.standard_normal(shape) * scale, DTYPES[dtype])  # noqa: E731
    return make((B, t, N, H)), make((B, s, K, H)), make((B, s, K, H))


def fused_clean(mesh, rng, configs) -> dict:
    """Clean rings of fused blocks (the portable Pallas kernel, interpreted; H=16), per ``(dtype,
    causal)`` of ``configs``: the output's error beside the one-device kernel's, the checks' worst
    ratio, and the gradients (the fused, checked ring backward; ``ring_local``'s unchecked one when
    causal) beside plain attention's in the same dtype, all against float32 attention."""
    h, found = 16, {"clean": []}
    make = lambda shape, dtype: jnp.asarray(rng.standard_normal(shape), DTYPES[dtype])  # noqa: E731
    err = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))  # noqa: E731
    for dtype, causal in configs:
        t = S if causal else T
        q, k, v = make((B, t, N, h), dtype), make((B, S, K, h), dtype), make((B, S, K, h), dtype)
        w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
        # one compilation gives the output, its report and (pulled back through w) the gradients
        o, pull, r = jax.vjp(lambda q, k, v: sharding.ring_attention(
            q, k, v, mesh=mesh, axis_name="seq", is_causal=causal, implementation="pallas", site="ring fused"),
            q, k, v, has_aux=True)
        g = pull(w.astype(o.dtype))
        one, _ = ftattn_jax.attention(q, k, v, is_causal=causal, implementation="pallas")
        ref = reference64(q, k, v, causal)
        loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * w)  # noqa: E731
        up = lambda x: x.astype(jnp.float32)  # noqa: E731  (float32's error is far below the inputs' dtype's)
        g64 = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(up(q), up(k), up(v), is_causal=causal)),
                       argnums=(0, 1, 2))(q, k, v)
        g32 = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)),
                       argnums=(0, 1, 2))(q, k, v)
        if causal:  # ring_local in the caller's shard_map: the fused backward, unchecked
            seq = PS(None, "seq")
            local = jax.shard_map(lambda q, k, v: sharding.ring_local(
                q, k, v, axis_name="seq", axis_size=P, checks=("qk_row", "softmax_dmr", "pv_row"), scale=h ** -0.5,
                is_causal=True, implementation="pallas")[0].astype(q.dtype), mesh=mesh, in_specs=(seq, seq, seq),
                out_specs=seq, check_vma=False)
            g_local = jax.grad(loss(local), argnums=(0, 1, 2))(q, k, v)
            found["local_grad_err"] = [err(a, b) for a, b in zip(g_local, g64)]
            found["local_grad_plain"] = [err(a, b) for a, b in zip(g32, g64)]
        found["clean"].append(dict(
            dtype=dtype, causal=causal, ran=r.blocks.ran.implementation, detected=bool(r.detected),
            err=err(o, ref), single_err=err(one, ref),
            worst=max(float(jnp.max(c.residual / c.threshold)) for c in (*r.blocks.checks.values(), *r.ring.values())),
            grad_err=[err(a, b) for a, b in zip(g, g64)], grad_plain=[err(a, b) for a, b in zip(g32, g64)]))
    return found


def fused_blocks(mesh, rng) -> dict:
    """The ring of fused blocks: a clean causal bfloat16 ring (``fused_clean``), the faults of
    ``FUSED_CASES`` and ``FUSED_BACKWARD_CASES`` (float16), "auto", refusals."""
    ring = lambda *a, **kw: sharding.ring_attention(*a, mesh=mesh, axis_name="seq", **kw)  # noqa: E731
    h, found = 16, {"faults": [], "errors": {}, **fused_clean(mesh, rng, [("bfloat16", True)])}
    make = lambda shape, dtype: jnp.asarray(rng.standard_normal(shape), DTYPES[dtype])  # noqa: E731
    q, k, v = make((B, T, N, h), "float16"), make((B, S, K, h), "float16"), make((B, S, K, h), "float16")
    for f, device, step, check in FUSED_CASES:
        _, r = ring(q, k, v, fault=f, implementation="pallas")
        flagged = {n: int(jnp.sum(c.flagged)) for n, c in {**r.blocks.checks, **r.ring}.items()}
        found["faults"].append(dict(site=f.site, detected=bool(r.detected), flagged=flagged, check=check,
                                    device=device, step=step,
                                    steps=[list(map(int, p)) for p in np.argwhere(np.asarray(r.steps))]))
    found["backward"] = fused_backward_faults(mesh, q, k, v, jnp.asarray(rng.standard_normal(q.shape), jnp.float16))
    _, r = ring(q, k, v)
    found["auto"] = [r.blocks.ran.implementation, r.blocks.ran.fallback]
    found["errors"] = refusals((
        ("lse", lambda: ring(q, k, v, implementation="pallas", fault=CASES[3][0])),
        ("float32", lambda: ring(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                 implementation="pallas")),
        ("name", lambda: ring(q, k, v, implementation="cudnn"))))
    return found


def fused_backward_faults(mesh, q, k, v, w) -> dict:
    """The fused ring backward's faults (``FUSED_BACKWARD_CASES``, one per kind of verdict): through
    ``ring_attention``'s gradient, counted under the site's ``(backward)``; through the per-device
    function in a ``shard_map`` (one compilation for all), flagged per device and step."""
    from ftattn_jax import ring_fused_backward
    from ftattn_spec import ring as spec_ring

    h = q.shape[-1]
    checks = ("qk_row", "softmax_dmr", "pv_row")
    found = {"located": [], "counted": []}
    grad = jax.grad(lambda q, k, v, f: jnp.sum(sharding.ring_attention(
        q, k, v, mesh=mesh, axis_name="seq", fault=f, implementation="pallas",
        site="ring fused bwd")[0].astype(jnp.float32)), argnums=(0, 1, 2))
    for f, _, _, _ in FUSED_BACKWARD_CASES:
        grad(q, k, v, f)
        t = ftattn_jax.counters.tally()
        found["counted"].append([t["ring fused bwd"].detected, t["ring fused bwd (backward)"].detected])
    static = sharding._Static("seq", P, checks, h ** -0.5, False, "pallas")

    def per_device(qc, kc, vc, wc, rp):
        (o, *_), lse = sharding._forward(qc, kc, vc, None, static)
        _, (ratios, steps) = ring_fused_backward.backward(qc, kc, vc, o, lse, wc, scale=static.scale, is_causal=False,
                                                          axis_name="seq", axis_size=P, checks=checks, plan=rp)
        return {n: jnp.sum(~(x <= 1.0))[None] for n, x in ratios.items()}, steps[None]
    seq = PS(None, "seq")
    located = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(seq, seq, seq, seq, PS()),
                                    out_specs=(PS("seq"), PS("seq")), check_vma=False))
    for f, _, _, _ in FUSED_BACKWARD_CASES:
        rp = jax.tree.map(jnp.asarray, spec_ring.plan(f, dict(B=B, T=T, S=S, N=N, K=K, H=h), P, "float16", checks,
                                                      implementation="pallas", backward=None))
        flagged, steps = located(q, k, v, w, rp)
        found["located"].append(dict(flagged={n: [int(x) for x in c] for n, c in flagged.items()},
                                     steps=[list(map(int, p)) for p in np.argwhere(np.asarray(steps))]))
    found["compilations"] = located._cache_size()
    return found


def backward_faults(mesh, rng) -> dict:
    """The checked backward: clean gradients unflagged; each fault of ``BACKWARD_CASES`` counted
    under the site's ``(backward)`` (one compilation serves the nine: a fault is data), and
    (through the per-device function in a ``shard_map``, compiled once) flagged at its device and
    step by its check; ``"raise"`` poisons the gradients."""
    from ftattn_jax import ring_backward
    from ftattn_spec import ring as spec_ring

    ring = lambda *a, **kw: sharding.ring_attention(*a, mesh=mesh, axis_name="seq", **kw)  # noqa: E731
    q, k, v = inputs(rng, T, S, "float32")
    w = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    found = {"counted": [], "located": []}
    jax.grad(lambda q: jnp.sum(ring(q, k, v, site="ring bwd clean")[0] * w))(q)
    grad = jax.grad(lambda q, k, v, f: jnp.sum(ring(q, k, v, fault=f, site="ring bwd")[0] * w), argnums=(0, 1, 2))
    for f, _, _, _ in BACKWARD_CASES:
        grad(q, k, v, f)
        t = ftattn_jax.counters.tally()
        found["counted"].append([t["ring bwd"].detected, t["ring bwd (backward)"].detected])
    g = jax.grad(lambda q, k, v: jnp.sum(ring(q, k, v, fault=BACKWARD_CASES[4][0], on_fault="raise",
                                              site="ring bwd raise")[0] * w), argnums=(0, 1, 2))(q, k, v)
    found["raise_nan"] = [bool(jnp.all(jnp.isnan(x))) for x in g]
    static = sharding._Static("seq", P, ("qk_row", "softmax_dmr", "pv_row"), H ** -0.5, False, "unfused")

    def per_device(qc, kc, vc, wc, rp):
        (o, *_), lse = sharding._forward(qc, kc, vc, None, static)
        me = jax.lax.axis_index("seq")
        _, (ratios, steps) = ring_backward.backward(
            qc, kc, vc, o, lse, wc, scale=static.scale, is_causal=False, axis_name="seq", axis_size=P,
            checked=True, inject=lambda x, st, site, axes: sharding._inject(x, rp, me, st, site, axes))
        return {n: jnp.sum(~(x <= 1.0))[None] for n, x in ratios.items()}, steps[None]
    seq = PS(None, "seq")
    located = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(seq, seq, seq, seq, PS()),
                                    out_specs=(PS("seq"), PS("seq")), check_vma=False))
    for f, _, _, _ in BACKWARD_CASES:
        rp = jax.tree.map(jnp.asarray, spec_ring.plan(f, dict(B=B, T=T, S=S, N=N, K=K, H=H), P, "float32",
                                                      static.checks, backward=None))
        flagged, steps = located(q, k, v, w, rp)
        found["located"].append(dict(flagged={n: [int(x) for x in c] for n, c in flagged.items()},
                                     steps=[list(map(int, p)) for p in np.argwhere(np.asarray(steps))]))
    found["compilations"] = located._cache_size()
    return found


def core(mesh, rng) -> dict:
    """Clean runs against float64, the forward's faults at their device and step, one compilation
    per fault count, gradients against one device, jit, ``"raise"`` and bad input."""
    out = {"devices": jax.device_count(), "clean": [], "faults": []}
    ring = lambda *a, **kw: sharding.ring_attention(*a, mesh=mesh, axis_name="seq", **kw)  # noqa: E731
    cases = [(d, c, sch, sc) for d in ("float32", "bfloat16", "float16") for c in (False, True)
             for sch, sc in (("full", 1.0), ("abft_all", 1.0), ("baseline", 1.0), ("full", 30.0))]
    cases = [x for i, x in enumerate(cases) if x[0] == "float32" or i % 3 == 0]  # every form in float32
    for dtype, causal, scheme, scale in cases:
        t, s = (S, S) if causal else (T, S)
        q, k, v = inputs(rng, t, s, dtype, scale)
        o, r = ring(q, k, v, scheme=scheme, is_causal=causal, site="ring clean")
        single, _ = ftattn_jax.attention(q, k, v, scheme="baseline", is_causal=causal)
        ref = reference64(q, k, v, causal)
        worst = {n: float(jnp.max(c.residual / c.threshold)) for n, c in r.ring.items()}
        worst.update({n: float(jnp.max(c.residual / c.threshold)) for n, c in r.blocks.checks.items()})
        qf, kf = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), N // K, axis=2)
        mu = float(np.max(np.abs(np.einsum("btnh,bsnh->bnts", qf, kf)))) / np.sqrt(H)
        out["clean"].append(dict(
            dtype=dtype, causal=causal, scheme=scheme, scale=scale, detected=bool(r.detected),
            mu=mu, ref_max=float(np.max(np.abs(ref))),
            err=float(np.max(np.abs(np.asarray(o, np.float64) - ref))),
            single_err=float(np.max(np.abs(np.asarray(single, np.float64) - ref))),
            out_dtype=str(o.dtype), out_spec=str(o.sharding.spec),
            row_specs=sorted({str(c.flagged.sharding.spec) for c in r.blocks.checks.values()}),
            worst=worst))
    q, k, v = inputs(rng, T, S, "float32")
    cases = [*CASES[:1], (RingFault("probs", (1, 2, 7, 3), bit=29, replica=1), 2, 2, "softmax_dmr"), *CASES[1:]]
    for f, device, step, check in cases:
        for scheme in ("full", "abft_all"):
            if f.replica and scheme != "full":
                continue
            if check == "softmax_dmr" and scheme == "abft_all":
                check = "softmax_exp"
            o, r = ring(q, k, v, scheme=scheme, fault=f, site="ring faults")
            flagged = {n: int(jnp.sum(c.flagged)) for n, c in {**r.blocks.checks, **r.ring}.items()}
            where = None
            if check in r.blocks.checks or check in ("lse", "merge", "weights"):
                c = r.blocks.checks.get(check) or r.ring[check]
                where = [int(x) for x in np.argwhere(np.asarray(c.flagged))[0]] if flagged[check] else None
            out["faults"].append(dict(site=f.site, scheme=scheme, check=check, detected=bool(r.detected),
                                      flagged=flagged, steps=[list(map(int, p)) for p in np.argwhere(np.asarray(r.steps))],
                                      device=device, step=step, where=where, index=list(f.index)))
    # one compilation serves every fault of the same count
    after = sharding._AfterBackward("ring faults (backward)", "report", 2.0**-24)
    run = sharding._ring(mesh, "seq", P, ("qk_row", "softmax_dmr", "pv_row"), H ** -0.5, False, "unfused", after)
    out["compiled_before"] = run._cache_size()  # by the faults above (off a GPU, "auto" runs the unfused core)
    before = run._cache_size()
    for f in (RingFault("probs", (0, 0, 0, 0), bit=30), RingFault("probs", (1, 5, 11, 19), bit=28)):
        ring(q, k, v, scheme="full", fault=f, site="ring faults")
    out["compilations"] = run._cache_size() - before
    # gradients: JAX autodiff through the ring against the single-device float32 path
    w = jnp.asarray(rng.standard_normal((B, S, N, H)), jnp.float32)
    qc, kc, vc = inputs(rng, S, S, "float32")
    loss_ring = lambda q, k, v: jnp.sum(ring(q, k, v, is_causal=True, site="ring grads")[0] * w)  # noqa: E731
    loss_one = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v, is_causal=True) * w)  # noqa: E731
    g1 = jax.grad(loss_ring, argnums=(0, 1, 2))(qc, kc, vc)
    g2 = jax.grad(loss_one, argnums=(0, 1, 2))(qc, kc, vc)
    out["grad_diff"] = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(g1, g2)]
    jitted = jax.jit(lambda q, k, v: ring(q, k, v, is_causal=True, fault=RingFault("probs", (0, 3, 9, 6), bit=30),
                                          site="ring jit"))
    _, rj = jitted(qc, kc, vc)
    out["jit_detected"] = bool(rj.detected)
    # bad input
    errors = {}
    for name, call in (("T", lambda: ring(q[:, :10], k, v)), ("axis", lambda: sharding.ring_attention(
            q, k, v, mesh=mesh, axis_name="x")), ("causal", lambda: ring(q, k, v, is_causal=True)),
            ("step", lambda: ring(q, k, v, fault=RingFault("out", (0, 0, 0, 0), step=4, bit=1))),
            ("implied", lambda: ring(q, k, v, fault=RingFault("probs", (0, 0, 0, 0), step=1, bit=1))),
            ("on_fault", lambda: ring(q, k, v, on_fault="correct")),
            ("backward", lambda: ring(q, k, v, scheme="baseline",
                                      fault=RingFault("bwd_dq", (0, 0, 0, 0), step=0, bit=1)))):
        try:
            call()
            errors[name] = None
        except (ValueError, TypeError) as e:
            errors[name] = f"{type(e).__name__}: {e}"
    out["errors"] = errors
    try:
        ring(q, k, v, on_fault="raise", fault=RingFault("out", (0, 0, 0, 0), step=0, bit=30))
        out["raised"] = False
    except ftattn_jax.FaultDetected:
        out["raised"] = True
    return out


PARTS = {"core": core, "backward": backward_faults, "fused": fused_blocks,
         "fused_float16": lambda mesh, rng: fused_clean(mesh, rng, [("float16", False)])}


def main() -> None:
    """``python ring_jax_worker.py PART``: one of ``PARTS``, each in a process of its own (a test
    module's fixture each), so that CI can leave the slow ones to ``-m slow``."""
    part = sys.argv[1]
    if part not in PARTS:
        raise SystemExit(f"part must be one of {sorted(PARTS)}, got {part!r}")
    mesh = Mesh(np.array(jax.devices()), ("seq",))
    out = PARTS[part](mesh, np.random.default_rng(7))
    out["tally"] = {s: [t.calls, t.detected, None if t.first is None else [t.first.check, list(t.first.index)]]
                    for s, t in ftattn_jax.counters.tally().items() if s.startswith("ring")}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
