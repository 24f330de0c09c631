"""ftattn_jax under jax.jit with inputs sharded by NamedSharding over batch and heads, on 8 host
devices in a process of its own (``tests/sharded_jax_worker.py``; the device count is fixed when
jax starts): outputs keep their sharding and equal the single-device ones, per-row report fields
stay sharded, nothing larger than a few integers per (batch, head) moves between devices, one
compilation serves every fault, and a fault is detected, counted, located and mapped to its device;
the same for the fused kernel, forward and backward (``ftattn_jax.fused.partitioned``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys


B, N = 4, 8
WORKER = os.path.join(os.path.dirname(__file__), "sharded_jax_worker.py")


def _run_worker(part: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, WORKER, part], capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["devices"] == 8
    return out


# One test per part, each its own process of 8 devices (under xdist a shared fixture would start
# it per worker).

def test_sharded_over_batch_and_heads():
    result = _run_worker("schemes")
    for scheme in ("baseline", "full", "abft_all"):
        r = result[scheme]
        assert r["out_spec"] == r["clean_spec"] == "P('data', None, 'heads', None)", scheme
        assert r["clean_diff"] < 1e-5, scheme
        assert r["compilations"] == 1, scheme  # two faults, one compiled function
        assert r["largest_gather"] <= B * N * 4, scheme  # a few integers per (batch, head): no data
        if scheme != "baseline":
            assert r["detected"] and r["single"], scheme
            assert r["row_specs"] == ["P('data', 'heads')"], scheme
            assert r["device"] == r["expected"], scheme  # batch 3, head 6: mesh position (1, 3)
    t = result["tally"]  # counted and located across devices
    assert t["sharded full"] == [2, 2, ["softmax_dmr", [3, 6, 5]]]
    assert t["sharded abft_all"][:2] == [2, 2] and t["sharded abft_all"][2][1] == [3, 6, 5]
    assert t["sharded baseline"][:2] == [2, 0]
    assert result["dropin"]["out_spec"] == "P('data', None, 'heads', None)"
    assert result["dropin"]["largest_gather"] <= B * N * 4


def test_fused_kernel_sharded_over_batch_and_heads():
    fz = _run_worker("pallas")  # the fused kernel: custom_partitioning keeps it per (batch, head) block
    for scheme in ("full", "abft_all"):
        r = fz[scheme]
        assert r["out_spec"] == "P('data', None, 'heads')", (scheme, r["out_spec"])
        assert r["equal"] and r["same"], scheme  # the same kernel on the same rows
        assert r["flagged"][{"full": "softmax_dmr", "abft_all": "softmax_exp"}[scheme]] == [[3, 6, 5]], scheme
        assert r["row_specs"] == ["P('data', 'heads')"], scheme
        assert r["largest_gather"] <= B * N * 4, scheme  # without the op: the inputs gathered everywhere
    gr = fz["grad"]
    assert gr["specs"] == ["P('data', None, 'heads')"] * 3
    # float16 gradients at most a rounding apart: one ulp of the largest, 2⁻¹⁰ of it (the side sums'
    # float32 reductions may run in another order per shard; the kernel is the same)
    assert all(d <= 2.0**-10 * m for d, m in zip(gr["diff"], gr["scale"])), (gr["diff"], gr["scale"])
    assert gr["largest_gather"] <= B * N * 4
    assert fz["tally"]["fused grad (backward)"] == [3, 1]  # sharded, single-device, and the faulted one
    assert fz["vmap_equal"]


def test_under_set_mesh():
    sm = _run_worker("set_mesh")  # under jax.set_mesh, explicit and auto axes, on all devices and on 4
    for site in ("set_mesh Explicit 8", "set_mesh Auto 8", "set_mesh Explicit 4"):
        r = sm[site]
        assert r["out_spec"] == r["grad_spec"] == r["pallas_spec"] == "P('data', None, 'heads', None)", (site, r)
        assert r["row_spec"] == "P('data', 'heads', None)", (site, r)
        assert max(r["out_diff"], r["dpa_diff"], r["grad_diff"], r["eager_diff"]) < 1e-5, (site, r)
        assert r["pallas_equal"] and r["pallas_detected"] and r["eager_detected"], site
        assert r["flagged"] == r["single"] == [[3, 6, 5]], site
        assert not r["callbacks"], site  # counted on the devices: no host callback in the program
        t = sm["tally"]
        assert t[site] == [3, 1] and t[site + " grad"] == [1, 0] and t[site + " pallas"] == [1, 1], (site, t)
        assert t[site + " eager"] == [2, 1], (site, t)
