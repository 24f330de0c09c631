"""The monitor and the counters' tallies: per site calls, detections and where the first one
flagged, read once per step, in both backends; no host callback per call in a jitted JAX step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import ftattn_jax
import ftattn_torch
from ftattn_jax import counters as jax_counters
from ftattn_spec import Fault, monitoring, tally

B, T, N, K, S, H = 3, 24, 4, 2, 40, 16  # every axis a different size


def _jax_inputs(seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (B, T, N, H))
    return q, jax.random.normal(ks[1], (B, S, K, H)), jax.random.normal(ks[2], (B, S, K, H))


def _torch_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, N, T, H, generator=g), torch.randn(B, K, S, H, generator=g),
            torch.randn(B, K, S, H, generator=g))


@pytest.fixture(autouse=True)
def _zero():
    jax_counters.reset()
    ftattn_torch.counters.reset()
    yield
    jax_counters.reset()
    ftattn_torch.counters.reset()


def test_axes_differ():
    assert len({B, T, N, K, S, H}) == 6


@pytest.mark.parametrize("fault,check", [(Fault("probs", (1, 3, 5, 7), bit=30), "softmax_dmr"),
                                         (Fault("out", (0, 2, 17, 3), bit=30), "pv_row"),
                                         (Fault("scores", (1, 1, 9, 30), bit=30), "qk_row")])
def test_jax_step_names_site_check_and_row_without_a_callback(monkeypatch, fault, check):
    q, k, v = _jax_inputs()

    def layer(x, name, plan):
        return ftattn_jax.attention(x, k, v, site=name, fault=plan)

    @jax.jit
    def step(q, plan):
        x, r0 = layer(q, "layer 0", None)
        x, r1 = layer(x.astype(q.dtype), "layer 1", plan)
        return x, (r0.detected, r1.detected)

    def no_callback(*a, **k):
        raise AssertionError("a host callback in a single-device jitted step")

    monkeypatch.setattr(jax.debug, "callback", no_callback)
    with pytest.raises(TypeError, match="on: expected a bool"):
        jax_counters.use_device_tallies(1)
    mon = ftattn_jax.monitor.Monitor()
    _, dets = step(q, fault)
    verdict = mon.step()
    assert [bool(d) for d in dets] == [False, True]
    assert verdict.detected and verdict.ranks == (0,) and verdict.calls == 2
    flagged = verdict.flagged()
    assert list(flagged) == ["layer 1"]
    b, n, t = fault.index[:3]
    assert flagged["layer 1"].first[0] == tally.Where(check, (b, n, t))
    assert f"layer 1: {check} at (b={b}, n={n}, row={t})" in verdict.summary()
    # the next step starts from zero, and the same compiled step serves another fault (no recompilation)
    step(q, Fault(fault.site, (0, 1, 3) + fault.index[3:], bit=30))
    again = mon.step()
    assert again.sites["layer 0"].calls == 1 and again.sites["layer 1"].detected == 1
    assert again.sites["layer 1"].first[0] == tally.Where(check, (0, 1, 3))
    assert step._cache_size() == 1


def test_jax_counts_equal_the_sum_of_the_reports_under_scan_vmap_and_eagerly():
    q, k, v = _jax_inputs(1)
    plans = [None, Fault("probs", (0, 1, 2, 3), bit=30), None, Fault("out", (1, 0, 4, 2), bit=29)]
    eager = [ftattn_jax.attention(q, k, v, site="eager", fault=p)[1] for p in plans]

    def body(carry, i):
        _, r = ftattn_jax.attention(q * (1.0 + i), k, v, site="scan")
        return carry + r.detected.astype(jnp.int32), None

    jax.jit(lambda: jax.lax.scan(body, 0, jnp.arange(3.0)))()
    batched = jax.jit(jax.vmap(lambda x: ftattn_jax.attention(x, k, v, site="vmap")[1].detected))(
        jnp.stack([q, -q]))  # vmap: counted through the callback, per element
    got = ftattn_jax.counters.tally()
    assert got["eager"].calls == 4 and got["eager"].detected == sum(bool(r.detected) for r in eager) == 2
    assert got["eager"].first == tally.Where("softmax_dmr", (0, 1, 2))
    assert got["scan"].calls == 3 and got["scan"].detected == 0
    assert got["vmap"].calls == 2 and got["vmap"].detected == int(np.sum(batched)) == 0
    assert ftattn_jax.counters.read()["eager"] == {"detected": 2, "calls": 4}


@pytest.mark.parametrize("site,check,index", [("probs", "softmax_dmr", (1, 3, 5, 7)), ("out", "pv_row", (0, 1, 20, 9))])
def test_torch_step_names_site_check_and_row(site, check, index):
    q, k, v = _torch_inputs()
    mon = ftattn_torch.monitor.Monitor()
    for layer in range(3):
        plan = Fault(site, index, bit=30) if layer == 2 else None
        _, r = ftattn_torch.attention(q, k, v, site=layer, fault=plan)
        assert bool(r.detected) == (layer == 2)
    verdict = mon.step()
    assert verdict.detected and list(verdict.flagged()) == ["layer 2"] and verdict.calls == 3
    assert verdict.sites["layer 2"].first[0] == tally.Where(check, index[:3])
    assert not mon.step().detected and mon.totals == monitoring.Totals(2, 1, 3, 1)


def test_replay_classifies_transient_persistent_and_device():
    q, k, v = _torch_inputs(2)
    bad = Fault("probs", (0, 0, 1, 1), bit=30)
    mon = ftattn_torch.monitor.Monitor()

    def run(plan):
        ftattn_torch.attention(q, k, v, site="replayed", fault=plan)

    run(bad)
    assert mon.step().detected
    assert mon.replay(lambda device: run(None)).kind == "transient"
    assert mon.replay(lambda device: run(bad)).kind == "persistent"
    assert mon.replay(lambda device: run(bad if device is None else None), other="other").kind == "device"
    assert mon.replay(lambda device: run(bad), other="other").kind == "persistent"
    run(None)
    with pytest.raises(ValueError, match="replay: expected no protected calls"):
        mon.replay(lambda device: run(None))
    mon.step()
    with pytest.raises(TypeError, match="fn: expected a callable"):
        mon.replay(3)


def test_jax_replay_on_another_device_traces_again_with_host_counters(monkeypatch):
    """A jitted step replayed on ``other``: traced again (its counters then come through the host,
    so a function jitted for another device needs no Ref on the default one), the setting
    restored after; a fault that follows the first device is called ``"device"``."""
    q, k, v = _jax_inputs(3)
    bad = Fault("probs", (1, 2, 3, 4), bit=30)
    seen = []

    def make(plan):
        @jax.jit
        def f(x):
            seen.append(jax_counters._use_refs["on"])  # the setting this trace sees
            return ftattn_jax.attention(x, k, v, site="replayed jax", fault=plan)[0]
        return f

    faulty, clean = make([bad]), make(None)
    # the replay clears JAX's caches; here only these two functions' (the rest of the process keeps its compilations)
    monkeypatch.setattr(jax, "clear_caches", lambda: (faulty.clear_cache(), clean.clear_cache()))
    mon = ftattn_jax.monitor.Monitor()
    jax.block_until_ready(faulty(q))
    assert mon.step().detected and seen == [True]
    before = jax_counters._use_refs["on"]
    got = mon.replay(lambda device: jax.block_until_ready((faulty if device is None else clean)(q)),
                     other=jax.devices()[0])
    assert got.kind == "device" and got.other_device is not None and not got.other_device.detected
    assert seen[-1] is False and jax_counters._use_refs["on"] == before
    assert mon.replay(lambda device: jax.block_until_ready(faulty(q)), other=jax.devices()[0]).kind == "persistent"
    assert seen[-1] is False and len(seen) >= 3


def test_every_backward_check_can_be_named_by_a_tally():
    """A backward's detection is located like a forward's: every check name a backward reports
    is one the tally can encode (``NAMED_CHECKS``), with an orientation."""
    from ftattn_jax.fused import pallas_backward as pb
    from ftattn_spec import ring_backward
    from ftattn_spec.schemes import ANY_CHECK_ORIENTATION, NAMED_CHECKS
    from ftattn_torch.fused import launch

    names = {*pb.ROW_CHECKS, *pb.KEY_CHECKS, "bwd_softmax_kv", *launch.BACKWARD_ROW_CHECKS,
             *launch.BACKWARD_GROUP_CHECKS, *launch.BACKWARD_KEY_CHECKS, *ring_backward.CHECKS}
    assert names <= set(NAMED_CHECKS) and set(NAMED_CHECKS) <= set(ANY_CHECK_ORIENTATION)
    assert len(set(NAMED_CHECKS)) == len(NAMED_CHECKS)


def test_on_step_and_tensorboard_export():
    class Writer:
        def __init__(self):
            self.rows = []

        def add_scalar(self, tag, value, step):
            self.rows.append((tag, value, step))

    w, seen = Writer(), []
    mon = ftattn_jax.monitor.Monitor(on_step=[monitoring.tensorboard(w), seen.append])
    q, k, v = _jax_inputs(3)
    ftattn_jax.attention(q, k, v, site="a", fault=Fault("probs", (1, 1, 1, 1), bit=30))
    mon.step()
    assert ("ftattn/detected", 1.0, 0) in w.rows and ("ftattn/detections/a", 1.0, 0) in w.rows
    assert len(seen) == 1 and seen[0].detected
    with pytest.raises(TypeError, match="writer: expected an object with add_scalar"):
        monitoring.tensorboard(object())
    with pytest.raises(TypeError, match="on_step: expected a callable"):
        ftattn_torch.monitor.Monitor(on_step=[3])
    with pytest.raises(ValueError, match="group: torch.distributed is not initialized"):
        ftattn_torch.monitor.Monitor(group=object())


def test_tally_rows_agree_between_backends():
    """The same fault gives the same row in both backends (the encoding is the spec's)."""
    qj, kj, vj = _jax_inputs(4)
    qt, kt, vt = (torch.from_numpy(np.array(x)).transpose(1, 2).contiguous() for x in (qj, kj, vj))
    plan = Fault("probs", (1, 2, 7, 11), bit=30)
    _, rj = ftattn_jax.attention(qj, kj, vj, fault=plan)
    _, rt = ftattn_torch.attention(qt, kt, vt, fault=plan)
    from ftattn_jax.common import OPS
    from ftattn_torch.common import ops
    row_j = np.asarray(tally.encode(rj, OPS)).tolist()
    row_t = tally.encode(rt, ops(qt.device)).tolist()
    assert row_j == row_t == [1, 1, 0, 1 + list(ftattn_jax.CHECKS).index("softmax_dmr"), 1, 2, 7]
    assert tally.decode(row_j).first == tally.Where("softmax_dmr", (1, 2, 7))
    with pytest.raises(ValueError, match="row: expected 7 integers"):
        tally.decode([1, 2])


def test_jax_counters_under_flax_scan_remat_shard_map_and_checkify():
    """Transformations a model wraps attention in: Flax's ``nn.scan`` (which traces its body with
    partial evaluation first) over ``nn.remat`` under ``grad``, ``shard_map``, and ``checkify``
    with the policy ``"raise"``: each runs and is counted."""
    nn = pytest.importorskip("flax.linen")
    from jax.experimental import checkify
    from jax.sharding import Mesh, PartitionSpec as P

    from ftattn_jax.flax import make_attention_fn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.MultiHeadDotProductAttention(num_heads=2, attention_fn=make_attention_fn())(x), None

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return scan()(x, None)[0]

    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 8))
    params = Model().init(jax.random.PRNGKey(0), x)
    jax_counters.reset()
    jax.jit(jax.grad(lambda p: Model().apply(p, x).sum()))(params)
    got = jax_counters.tally()
    assert [t.calls for t in got.values()] == [6]  # 3 layers, each run again by remat in the backward
    assert "MultiHeadDotProductAttention" in next(iter(got))  # the module path, not a file and line

    q, k, v = _jax_inputs(5)
    mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
    f = jax.jit(jax.shard_map(lambda q: ftattn_jax.attention(q, k, v, site="smap")[0], mesh=mesh,
                              in_specs=P("x"), out_specs=P("x")))
    assert f(q).shape == q.shape and jax_counters.tally()["smap"].calls == 1
    with ftattn_jax.fault_policy("raise"):
        err, _ = checkify.checkify(jax.jit(lambda q: ftattn_jax.dot_product_attention(
            q, k, v, site="chk", fault=Fault("probs", (0, 1, 2, 3), bit=30))))(q)
    assert err.get() is not None and jax_counters.tally()["chk"].detected == 1


def test_jax_counters_under_flax_nnx_jit_grad_vmap_and_scan():
    """``nnx.jit`` around ``nnx.grad`` (the first call of a site made inside the trace), ``nnx.vmap``
    and ``nnx.scan`` over layers: each runs and counts every call."""
    nnx = pytest.importorskip("flax.nnx")
    from ftattn_jax.flax import make_attention_fn

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.att = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=rngs,
                                              attention_fn=make_attention_fn())

        def __call__(self, x):
            return self.att(x)

    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 8))
    block = Block(nnx.Rngs(0))
    jax_counters.reset()
    nnx.jit(lambda m, x: nnx.grad(lambda m: m(x).sum())(m))(block, x)
    assert sum(t.calls for t in jax_counters.tally().values()) == 1
    nnx.vmap(lambda m, x: m(x), in_axes=(None, 0))(block, jnp.stack([x, x]))
    assert sum(t.calls for t in jax_counters.tally().values()) == 3

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return Block(rngs)

    blocks = make(nnx.Rngs(0))

    @nnx.jit
    def run(blocks, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def body(b, x):
            return b(x)
        return body(blocks, x)

    assert run(blocks, x).shape == x.shape
    assert sum(t.calls for t in jax_counters.tally().values()) == 3 + 3  # the scan ran three layers


def test_device_tallies_can_be_turned_off():
    """``use_device_tallies(False)``: traced calls count through the host callback (the escape for
    arguments on another platform than the default device's), with the same counts."""
    q, k, v = _jax_inputs(6)
    before = jax_counters.use_device_tallies(False)
    try:
        calls = []
        real = jax.debug.callback

        def spy(*a, **kw):
            calls.append(1)
            return real(*a, **kw)

        jax.debug.callback = spy
        try:
            jax.jit(lambda q: ftattn_jax.attention(q, k, v, site="cb", fault=Fault("probs", (2, 1, 3, 4), bit=30))[0])(q)
        finally:
            jax.debug.callback = real
        assert calls and jax_counters.tally()["cb"] == tally.SiteTally(1, 1, 0, tally.Where("softmax_dmr", (2, 1, 3)))
    finally:
        assert jax_counters.use_device_tallies(before) is False
