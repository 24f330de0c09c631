"""``ftattn_torch.distributed.global_verdict`` across two gloo processes on the CPU: heads split
across ranks, a fault injected on one rank only; every rank gets the same verdict, which names that
rank, the check and the row; a clean step is clean on every rank."""

from __future__ import annotations


import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from tests import gloo  # noqa: E402

import ftattn_torch  # noqa: E402
from ftattn_spec.faults import Fault  # noqa: E402
from ftattn_torch.distributed import GlobalVerdict, Where, global_verdict  # noqa: E402

WORLD = 2
B, N, T, S, H = 2, 6, 9, 11, 16  # every axis a different size; N heads split across the ranks



def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        rng = np.random.default_rng(0)
        q, k, v = (torch.tensor(rng.standard_normal((B, N, L, H)), dtype=torch.float32) for L in (T, S, S))
        heads = slice(rank * N // WORLD, (rank + 1) * N // WORLD)  # this rank's heads
        q, k, v = q[:, heads], k[:, heads], v[:, heads]
        got = {}
        mon = ftattn_torch.monitor.Monitor()
        for step, fault in (("clean", None), ("faulty", Fault("probs", (1, 2, 4, 3), bit=28) if rank == 1 else None)):
            _, rep = ftattn_torch.attention(q, k, v, scheme="full", fault=fault, site="layer 5")
            ftattn_torch.attention(q, k, v, scheme="full", site="layer 6")
            g = global_verdict(rep)
            got[step] = dict(detected=g.detected, ranks=list(g.ranks), checks={c: list(r) for c, r in g.checks.items()},
                             inputs_finite=g.inputs_finite, first={str(r): [w.check, list(w.index)] for r, w in g.first.items()})
            m = mon.step()  # every rank's tallies of both sites, one all_gather_object
            got["monitor " + step] = dict(detected=m.detected, ranks=list(m.ranks), calls=m.calls,
                                          sites={s: [v.calls, v.detected, list(v.ranks),
                                                     {str(r): [w.check, list(w.index)] for r, w in v.first.items()}]
                                                 for s, v in m.sites.items()})
        gloo.write(out, rank, got)
    finally:
        dist.destroy_process_group()


def test_every_rank_gets_one_verdict_naming_the_faulty_rank(tmp_path):
    got = gloo.spawn(_worker, WORLD, tmp_path)
    assert got[0] == got[1]
    clean, faulty = got[0]["clean"], got[0]["faulty"]
    assert not clean["detected"] and clean["ranks"] == [] and clean["first"] == {} and clean["inputs_finite"]
    assert set(clean["checks"]) == {"qk_row", "qk_col", "softmax_dmr", "pv_row", "pv_col"}
    assert faulty["detected"] and faulty["ranks"] == [1] and faulty["checks"]["softmax_dmr"] == [1]
    assert faulty["first"] == {"1": ["softmax_dmr", [1, 2, 4]]}
    # the monitor, over both sites of the step: the same verdict on both ranks, naming rank, layer, check, row
    m_clean, m_faulty = got[0]["monitor clean"], got[0]["monitor faulty"]
    assert not m_clean["detected"] and m_clean["calls"] == 4
    assert m_faulty == dict(detected=True, ranks=[1], calls=4,
                            sites={"layer 5": [2, 1, [1], {"1": ["softmax_dmr", [1, 2, 4]]}],
                                   "layer 6": [2, 0, [], {}]})


def test_refuses_what_it_cannot_use():
    q = torch.randn(1, 2, 3, 8)
    _, rep = ftattn_torch.attention(q, q, q)
    with pytest.raises(TypeError, match="report: expected an ftattn Report"):
        global_verdict({"detected": True})
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="group: torch.distributed is not initialized"):
            global_verdict(rep)
    assert GlobalVerdict._fields == ("detected", "ranks", "checks", "inputs_finite", "first")
    assert Where("pv_row", (0, 1, 2)).index == (0, 1, 2)
