"""DTensor inputs (``ftattn_torch.dtensor``) on a 2 × 2 device mesh of four gloo processes on the
CPU: batch split over one mesh dim and heads over the other, or heads alone, or everything
replicated. Every rank's output (gathered) equals the single-process call, the report's per-row
fields are DTensors placed as the query, a fault given at global indices is flagged at them and
every rank's ``detected`` says so, gradients flow back to the DTensor inputs and equal the
single-process ones, ``on_fault="raise"`` raises on every rank, and the SDPA drop-in does the same;
a sequence split is refused naming the argument."""

from __future__ import annotations


import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from tests import gloo  # noqa: E402

WORLD = 4
B, N, K, T, S, H = 2, 4, 2, 9, 11, 8  # B, N and K split in two; T, S and H differ from them and each other



def _worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    import ftattn_torch
    from ftattn_spec.faults import Fault, FaultDetected

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        rng = np.random.default_rng(0)
        q, k, v = (torch.tensor(rng.standard_normal(s), dtype=torch.float32)
                   for s in ((B, N, T, H), (B, K, S, H), (B, K, S, H)))
        w = torch.tensor(rng.standard_normal((B, N, T, H)), dtype=torch.float32)
        mask = torch.tensor(rng.random((1, N, T, S)) < 0.8)
        fault = Fault("probs", (1, 3, 4, 5), bit=28)  # batch 1, head 3: mesh coordinate (1, 1), rank 3
        ref, ref_rep = ftattn_torch.attention(q, k, v, fault=fault, mask=mask, site="single")
        got = {}
        for name, placements in (("dp×tp", [Shard(0), Shard(1)]), ("tp", [Replicate(), Shard(1)]),
                                 ("replicated", [Replicate(), Replicate()])):
            qd, kd, vd = (distribute_tensor(x, mesh, placements) for x in (q, k, v))
            o, rep = ftattn_torch.attention(qd, kd, vd, fault=fault, mask=mask, site=f"dtensor {name}")
            flagged = rep.checks["softmax_dmr"].flagged
            qg, kg, vg = (distribute_tensor(x, mesh, placements).requires_grad_() for x in (q, k, v))
            (ftattn_torch.attention(qg, kg, vg, mask=mask)[0] * distribute_tensor(w, mesh, placements)).sum().backward()
            qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
            (ftattn_torch.attention(qs, ks, vs, mask=mask)[0] * w).sum().backward()
            try:
                ftattn_torch.attention(qd, kd, vd, fault=fault, on_fault="raise")
                raised = False
            except FaultDetected:
                raised = True
            so = ftattn_torch.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
            so1 = ftattn_torch.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            got[name] = dict(
                out_type=type(o).__name__, placements=[str(p) for p in o.placements],
                out_diff=float((o.full_tensor() - ref).abs().max()),
                report_type=type(flagged).__name__, report_placements=[str(p) for p in flagged.placements],
                flagged=torch.nonzero(flagged.full_tensor()).tolist(),
                single=torch.nonzero(ref_rep.checks["softmax_dmr"].flagged).tolist(),
                detected=bool(rep.detected), raised=raised,
                grad_diff=[float((a.grad.full_tensor() - b.grad).abs().max()) for a, b in ((qg, qs), (kg, ks), (vg, vs))],
                sdpa_type=type(so).__name__, sdpa_diff=float((so.full_tensor() - so1).abs().max()))
        try:
            ftattn_torch.attention(*(distribute_tensor(x, mesh, [Replicate(), Shard(2)]) for x in (q, k, v)))
            got["refused"] = None
        except ValueError as e:
            got["refused"] = str(e)
        try:
            ftattn_torch.attention(distribute_tensor(q, mesh, [Replicate(), Shard(1)]), k, v)
            got["mixed"] = None
        except TypeError as e:
            got["mixed"] = str(e)
        try:
            ftattn_torch.attention(*(distribute_tensor(x, mesh, [Shard(0), Shard(1)]) for x in (q, k, v)),
                                   fault=Fault("probs", (0, N, 1, 1), bit=3))
            got["out of range"] = None
        except ValueError as e:
            got["out of range"] = str(e)
        got["tally"] = {s: [t.calls, t.detected] for s, t in ftattn_torch.counters.tally().items()
                        if s.startswith("dtensor")}
        got["where"] = {s: None if t.first is None else [t.first.check, list(t.first.index)]
                        for s, t in ftattn_torch.counters.tally().items() if s.startswith("dtensor")}
        assert isinstance(ref, torch.Tensor) and not isinstance(ref, DTensor)
        gloo.write(out, rank, got)
    finally:
        dist.destroy_process_group()


def test_dtensor_inputs_over_a_2x2_mesh(tmp_path):
    got = gloo.spawn(_worker, WORLD, tmp_path)
    for rank, g in enumerate(got):
        for name, placements in (("dp×tp", ["S(0)", "S(1)"]), ("tp", ["R", "S(1)"]), ("replicated", ["R", "R"])):
            r = g[name]
            assert r["out_type"] == r["report_type"] == r["sdpa_type"] == "DTensor", (rank, name)
            assert r["placements"] == r["report_placements"] == placements, (rank, name, r["placements"])
            assert r["out_diff"] < 1e-6 and r["sdpa_diff"] < 1e-6, (rank, name, r)
            assert max(r["grad_diff"]) < 1e-5, (rank, name, r["grad_diff"])
            assert r["flagged"] == r["single"] == [[1, 3, 4]], (rank, name, r["flagged"])
            assert r["detected"] and r["raised"], (rank, name)  # every rank: the verdict is global
        assert g["mixed"].startswith("key: expected a DTensor"), g["mixed"]
        assert g["out of range"].startswith("fault.index: expected head index 0 <= i < 4"), g["out of range"]
        assert "S(2)" in g["refused"] and "ring_attention" in g["refused"], g["refused"]
    # each rank counts its own block: the fault's block on rank 3 (batch and heads split) only;
    # with heads split alone, on ranks 1 and 3; replicated, on every rank
    assert [g["tally"]["dtensor dp×tp"] for g in got] == [[1, 0], [1, 0], [1, 0], [1, 1]]
    assert [g["tally"]["dtensor tp"][1] for g in got] == [0, 1, 0, 1]
    assert [g["tally"]["dtensor replicated"][1] for g in got] == [1, 1, 1, 1]
    # located at the global batch, head and row, wherever the rank's block starts
    for g in got:
        for name in ("dp×tp", "tp", "replicated"):
            if g["tally"][f"dtensor {name}"][1]:
                assert g["where"][f"dtensor {name}"] == ["softmax_dmr", [1, 3, 4]], (name, g["where"])
