"""``ftattn_torch.distributed.ring_attention`` over 4 gloo processes on the CPU: the output equals
float64 attention as closely as one process's does, nothing clean is flagged, a fault at every
ring site is detected on every rank at its rank and step, every rank's gradients equal float64
autograd's of the whole sequence as closely as plain attention's do, and bad input is refused by
name."""

from __future__ import annotations


import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from tests import gloo  # noqa: E402

import ftattn_torch  # noqa: E402
from tests.ring_cases import BACKWARD_CASES, CASES, FUSED_BACKWARD_CASES, FUSED_CASES, refusals  # noqa: E402  (fault, rank, step, the check that flags it)
from ftattn_torch.distributed import ring_attention  # noqa: E402

WORLD = 4
B, N, K, H = 2, 6, 3, 8
T, S = 12, 20  # chunks of 3 queries and 5 keys; causal runs use T = S = 20
U = 2.0**-24



def _reference64(q, k, v, causal):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    k, v = np.repeat(k, N // K, axis=1), np.repeat(v, N // K, axis=1)
    s = np.einsum("bnth,bnsh->bnts", q, k) / np.sqrt(H)
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bnts,bnsh->bnth", p / p.sum(-1, keepdims=True), v), np.abs(s[np.isfinite(s)]).max()


def _sdpa(q, k, v, causal):
    """Plain attention with autograd, in the inputs' dtype (kv heads repeated)."""
    k, v = k.repeat_interleave(N // K, dim=1), v.repeat_interleave(N // K, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _grads(rank: int) -> list[dict]:
    """Per dtype and mask: this rank's gradients' error against float64 autograd of the whole
    sequence, beside the error of plain attention's in the same dtype."""
    found = []
    rng = np.random.default_rng(11)
    for dtype in (torch.float64, torch.float32):
        for causal in (False, True):
            t = S if causal else T
            q, k, v, g = (torch.tensor(rng.standard_normal(sh)) for sh in ((B, N, t, H), (B, K, S, H),
                                                                           (B, K, S, H), (B, N, t, H)))
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            _sdpa(*leaves, causal).backward(g)
            ref = [x.grad for x in leaves]
            low = [x.to(dtype).detach().clone().requires_grad_() for x in (q, k, v)]
            _sdpa(*low, causal).backward(g.to(dtype))
            rows, keys = slice(rank * t // WORLD, (rank + 1) * t // WORLD), slice(rank * S // WORLD,
                                                                                 (rank + 1) * S // WORLD)
            mine = [x[:, :, sl].to(dtype).detach().clone().requires_grad_() for x, sl in ((q, rows), (k, keys), (v, keys))]
            o, rep = ring_attention(*mine, is_causal=causal, site="ring grads")
            o.backward(g[:, :, rows].to(dtype))
            found.append(dict(dtype=str(dtype), causal=causal, detected=bool(rep.detected), err=[
                float((x.grad.double() - r[:, :, sl]).abs().max()) for x, r, sl in zip(mine, ref, (rows, keys, keys))],
                plain=[float((x.grad[:, :, sl].double() - r[:, :, sl]).abs().max())
                       for x, r, sl in zip(low, ref, (rows, keys, keys))],
                scale=[float(r.abs().max()) for r in ref]))
    return found


def _raised(backward, rep) -> dict | None:
    """What ``backward()`` raised on this rank (None if it did not): the global verdict, per check
    the flags on this rank, and the rank × step table; ``forward``: the forward's verdict."""
    from ftattn_spec.faults import FaultDetected

    try:
        backward()
    except FaultDetected as e:
        r = e.report
        return dict(detected=bool(r.detected), forward=bool(rep.detected),
                    flagged={n: int(c.flagged.sum()) for n, c in r.blocks.checks.items()},
                    steps=[list(map(int, p)) for p in r.steps.nonzero().tolist()])
    return None


def _backward_faults(rank: int) -> dict:
    """Each fault of ``BACKWARD_CASES`` in the checked backward, raised on every rank; and the
    refusal of a backward site where no backward runs."""
    rng = np.random.default_rng(17)
    q, k, v, g = (torch.tensor(rng.standard_normal(sh), dtype=torch.float32)
                  for sh in ((B, N, T, H), (B, K, S, H), (B, K, S, H), (B, N, T, H)))
    rows, keys = slice(rank * 3, rank * 3 + 3), slice(rank * 5, rank * 5 + 5)
    found = {"faults": []}
    for i, (f, _, _, _) in enumerate(BACKWARD_CASES):
        mine = [x[:, :, sl].clone().requires_grad_() for x, sl in ((q, rows), (k, keys), (v, keys))]
        o, rep = ring_attention(*mine, fault=f, on_fault="raise", site=f"ring bwd {i}")
        found["faults"].append(_raised(lambda: o.backward(g[:, :, rows]), rep))
    mine = [x[:, :, sl] for x, sl in ((q, rows), (k, keys), (v, keys))]
    found["errors"] = refusals((("no grad", lambda: ring_attention(*mine, fault=BACKWARD_CASES[0][0])),))
    return found


#: The fused ring's cases CI runs (the Triton interpreter takes minutes per ring): a causal
#: bfloat16 ring with its gradients, a fault the kernel flags (``probs``) and one the ring's transit
#: check flags (``key``), a backward fault per step (``bwd_dq``) and one in transit (``bwd_dk_acc``);
#: the rest under ``-m slow``.
FUSED_PARTS = {
    "fused": ([(torch.bfloat16, True)], [FUSED_CASES[0], FUSED_CASES[4]],
              [c for c in FUSED_BACKWARD_CASES if c[0].site in ("bwd_dq", "bwd_dk_acc")]),
    "fused_more": ([(torch.float16, False)], [c for i, c in enumerate(FUSED_CASES) if i not in (0, 4)],
                   [c for c in FUSED_BACKWARD_CASES if c[0].site not in ("bwd_dq", "bwd_dk_acc")]),
}


def _fused(rank: int, part: str) -> dict:
    """The ring of fused blocks (Triton, interpreted; H=16) over ``FUSED_PARTS[part]``: clean errors
    and gradients beside the one-process kernel's, forward and backward faults, what it refuses."""
    configs, forward_cases, backward_cases = FUSED_PARTS[part]
    found = {"clean": [], "faults": [], "errors": {}}
    rng = np.random.default_rng(5)
    h = 16
    keys = slice(rank * S // WORLD, (rank + 1) * S // WORLD)
    for dtype, causal in configs:
        t = S if causal else T
        q, k, v = (torch.tensor(rng.standard_normal(sh)).to(dtype) for sh in ((B, N, t, h), (B, K, S, h),
                                                                              (B, K, S, h)))
        rows = slice(rank * t // WORLD, (rank + 1) * t // WORLD)
        ref, _ = ftattn_torch.attention(q.double(), k.double(), v.double(), scheme="baseline", is_causal=causal)
        o, rep = ring_attention(q[:, :, rows], k[:, :, keys], v[:, :, keys], implementation="triton",
                                is_causal=causal, site="ring fused")
        one, _ = ftattn_torch.attention(q, k, v, implementation="triton", is_causal=causal)
        g = torch.tensor(rng.standard_normal((B, N, t, h))).to(dtype)
        with torch.enable_grad():  # the fused, checked backward around the ring, from the merged log-sum-exp
            mine = [x[:, :, sl].clone().requires_grad_() for x, sl in ((q, rows), (k, keys), (v, keys))]
            og, _ = ring_attention(*mine, implementation="triton", is_causal=causal, site="ring fused grads")
            og.backward(g[:, :, rows])
            exact = [x.double().requires_grad_() for x in (q, k, v)]
            _sdpa(*exact, causal).backward(g.double())
            one_in = [x.clone().requires_grad_() for x in (q, k, v)]
            one_out, _ = ftattn_torch.attention(*one_in, implementation="triton", is_causal=causal)
            one_out.backward(g)
        grad_err = [float((x.grad.double() - r.grad[:, :, sl]).abs().max())
                    for x, r, sl in zip(mine, exact, (rows, keys, keys))]
        grad_single = [float((x.grad[:, :, sl].double() - r.grad[:, :, sl]).abs().max())
                       for x, r, sl in zip(one_in, exact, (rows, keys, keys))]
        grad_scale = [float(r.grad.abs().max()) for r in exact]
        found["clean"].append(dict(
            ran=rep.blocks.ran.implementation, detected=bool(rep.detected),
            err=float((o.double() - ref[:, :, rows]).abs().max()),
            single_err=float((one.double() - ref).abs().max()), dtype=str(dtype), grad_err=grad_err,
            grad_single=grad_single, grad_scale=grad_scale,
            worst=max(float((c.residual / c.threshold).max()) for c in
                      (*rep.blocks.checks.values(), *rep.ring.values()))))
    q, k, v, g = (torch.tensor(rng.standard_normal(sh), dtype=torch.float16)
                  for sh in ((B, N, T, h), (B, K, S, h), (B, K, S, h), (B, N, T, h)))
    rows = slice(rank * 3, rank * 3 + 3)
    found["backward"] = []
    for i, (f, _, _, _) in enumerate(backward_cases):  # each launch injects its step's faults
        mine = [x[:, :, sl].clone().requires_grad_() for x, sl in ((q, rows), (k, keys), (v, keys))]
        with torch.enable_grad():
            o, rep = ring_attention(*mine, fault=f, implementation="triton", on_fault="raise",
                                    site=f"ring fused bwd {i}")
        found["backward"].append(_raised(lambda: o.backward(g[:, :, rows]), rep))
    for f, _, _, check in forward_cases:
        o, rep = ring_attention(q[:, :, rows], k[:, :, keys], v[:, :, keys], fault=f, implementation="triton")
        flagged = {n: int(c.flagged.sum()) for n, c in {**rep.blocks.checks, **rep.ring}.items()}
        found["faults"].append(dict(detected=bool(rep.detected), flagged=flagged,
                                    steps=[list(map(int, p)) for p in rep.steps.nonzero().tolist()]))
    _, rep = ring_attention(q[:, :, rows], k[:, :, keys], v[:, :, keys])
    found["auto"] = [rep.blocks.ran.implementation, rep.blocks.ran.fallback]
    found["errors"] = refusals((
        ("lse", lambda: ring_attention(q[:, :, rows], k[:, :, keys], v[:, :, keys], implementation="triton",
                                       fault=CASES[3][0])),
        ("float32", lambda: ring_attention(q[:, :, rows].float(), k[:, :, keys].float(), v[:, :, keys].float(),
                                           implementation="triton")),
        ("name", lambda: ring_attention(q[:, :, rows], k[:, :, keys], v[:, :, keys], implementation="cudnn"))))
    return found


def _core(rank: int) -> dict:
    """Clean rings against float64, the forward's faults on every rank, refusals, gradients and
    the checked backward's faults (the unfused core: "auto" off a GPU)."""
    got = {"clean": [], "faults": []}
    rng = np.random.default_rng(3)
    for dtype in (torch.float32, torch.bfloat16):
        for causal in (False, True):
            t = S if causal else T
            q, k, v = (rng.standard_normal(shape) for shape in ((B, N, t, H), (B, K, S, H), (B, K, S, H)))
            tq, tk, tv = (torch.tensor(x).to(dtype) for x in (q, k, v))
            ref, mu = _reference64(tq.double().numpy(), tk.double().numpy(), tv.double().numpy(), causal)
            rows, keys = slice(rank * t // WORLD, (rank + 1) * t // WORLD), slice(rank * S // WORLD,
                                                                                 (rank + 1) * S // WORLD)
            o, rep = ring_attention(tq[:, :, rows], tk[:, :, keys], tv[:, :, keys], scheme="full",
                                    is_causal=causal, site="ring clean")
            single, _ = ftattn_torch.attention(tq, tk, tv, scheme="baseline", is_causal=causal)
            got["clean"].append(dict(
                detected=bool(rep.detected), mu=float(mu), ref_max=float(np.abs(ref).max()),
                err=float(np.abs(o.double().numpy() - ref[:, :, rows]).max()),
                single_err=float(np.abs(single.double().numpy() - ref).max()),
                worst=max(float((c.residual / c.threshold).max()) for c in
                          (*rep.blocks.checks.values(), *rep.ring.values()))))
    q, k, v = (torch.tensor(rng.standard_normal(shape), dtype=torch.float32)
               for shape in ((B, N, T, H), (B, K, S, H), (B, K, S, H)))
    rows, keys = slice(rank * 3, rank * 3 + 3), slice(rank * 5, rank * 5 + 5)
    for f, _, _, check in CASES:
        o, rep = ring_attention(q[:, :, rows], k[:, :, keys], v[:, :, keys], fault=f, site="ring faults")
        flagged = {n: int(c.flagged.sum()) for n, c in {**rep.blocks.checks, **rep.ring}.items()}
        got["faults"].append(dict(detected=bool(rep.detected), flagged=flagged, check=check,
                                  steps=[list(map(int, p)) for p in rep.steps.nonzero().tolist()]))
    got["errors"] = refusals((
        ("on_fault", lambda: ring_attention(q[:, :, rows], k[:, :, keys], v[:, :, keys], on_fault="nan")),
        ("causal", lambda: ring_attention(q[:, :, rows], k[:, :, keys], v[:, :, keys], is_causal=True))))
    with torch.enable_grad():
        got["grads"] = _grads(rank)
        got["backward"] = _backward_faults(rank)
    return got


PARTS = {"core": _core, "fused": lambda rank: _fused(rank, "fused"),
         "fused_more": lambda rank: _fused(rank, "fused_more")}


def _worker(rank: int, port: int, out: str, part: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        with torch.no_grad():
            got = PARTS[part](rank)
        t = ftattn_torch.counters.tally()
        got["tally"] = {s: [x.calls, x.detected] for s, x in t.items() if s.startswith("ring")}
        gloo.write(out, rank, got)
    finally:
        dist.destroy_process_group()


def test_ring_over_four_ranks(tmp_path):
    for rank, g in enumerate(gloo.spawn(_worker, WORLD, tmp_path, "core")):
        for c in g["clean"]:
            assert not c["detected"] and c["worst"] < 1.0, (rank, c)
            assert c["err"] <= 4 * c["single_err"] + 16 * U * (c["mu"] + 3.0) * c["ref_max"], (rank, c)
        for (f, frank, step, check), r in zip(CASES, g["faults"]):
            assert r["detected"], (rank, f)  # on every rank: the verdict is global
            assert r["steps"] and all(d == frank for d, _ in r["steps"]), (rank, f, r["steps"])
            assert min(s for _, s in r["steps"]) == step, (rank, f, r["steps"])
            if rank == frank:
                assert r["flagged"][check] >= 1, (f, r["flagged"])
        e = g["errors"]
        for c in g["grads"]:  # every rank's dQ, dK, dV against float64 autograd of the whole sequence
            assert not c["detected"], (rank, c)
            for err, plain, big in zip(c["err"], c["plain"], c["scale"]):
                if c["dtype"] == "torch.float64":
                    assert err <= 1e-12 * big, (rank, c)
                else:
                    assert err <= 4 * plain + 8 * U * big, (rank, c)
        assert e["on_fault"].startswith("ValueError: on_fault:")
        assert e["causal"].startswith("ValueError: is_causal:")
        assert g["tally"]["ring faults"] == [len(CASES), len(CASES)]
        assert g["tally"]["ring clean"] == [4, 0]
        assert g["tally"]["ring grads"] == [4, 0]
        assert g["tally"]["ring grads (backward)"] == [4, 0]  # the checked backward, clean
        for i, ((f, frank, step, check), r) in enumerate(zip(BACKWARD_CASES, g["backward"]["faults"])):
            _backward_fault_seen(rank, f, frank, step, check, r)
            assert g["tally"][f"ring bwd {i}"] == [1, 0] and g["tally"][f"ring bwd {i} (backward)"] == [1, 1]
        assert g["backward"]["errors"]["no grad"].startswith("ValueError: fault.site: 'bwd_scores'"), g["backward"]


@pytest.mark.parametrize("part", ["fused", pytest.param("fused_more", marks=pytest.mark.slow)])
def test_ring_of_fused_blocks_over_four_ranks(tmp_path, part):
    """The ring of fused blocks (Triton, interpreted): clean errors and gradients beside one
    process's kernel, each forward and backward fault on every rank at its rank and step."""
    configs, forward_cases, backward_cases = FUSED_PARTS[part]
    for rank, fz in enumerate(gloo.spawn(_worker, WORLD, tmp_path, part)):
        for c in fz["clean"]:  # each block rounded to the input dtype before the merge: P roundings
            assert c["ran"] == "triton" and not c["detected"] and c["worst"] < 1.0, (rank, c)
            assert c["err"] <= 2 * WORLD * c["single_err"], (rank, c)
            for err, single, big in zip(c["grad_err"], c["grad_single"], c["grad_scale"]):
                assert err <= 4 * single + 8 * U * big, (rank, c)  # beside the one-process fused backward's
        assert len(fz["faults"]) == len(forward_cases) and len(fz["backward"]) == len(backward_cases)
        for (f, frank, step, check), r in zip(forward_cases, fz["faults"]):
            assert r["detected"] and r["steps"] and all(d == frank for d, _ in r["steps"]), (rank, f, r)
            assert min(s for _, s in r["steps"]) == step, (rank, f, r["steps"])
            if rank == frank:
                assert r["flagged"][check] >= 1, (f, r["flagged"])
        assert fz["auto"][0] == "unfused" and "not on a GPU" in fz["auto"][1]
        assert fz["errors"]["lse"].startswith("ValueError: fault.site: 'lse'"), fz["errors"]
        assert fz["errors"]["float32"].startswith("TypeError: query:"), fz["errors"]
        assert fz["errors"]["name"].startswith(("ValueError: implementation:", "TypeError: implementation:")), fz
        for i, ((f, frank, step, check), r) in enumerate(zip(backward_cases, fz["backward"])):
            _backward_fault_seen(rank, f, frank, step, check, r)
            assert fz["tally"][f"ring fused bwd {i} (backward)"] == [1, 1]
        assert fz["tally"]["ring fused"] == [len(configs), 0]
        assert fz["tally"]["ring fused grads (backward)"] == [len(configs), 0]


def _backward_fault_seen(rank: int, f, frank: int, step: int, check: str, r) -> None:
    """A backward fault raised on every rank, first seen at its device and step by that device
    alone (later a corrupted S or P also moves the row's softmax sum, and a corrupted accumulator
    stays so on every later device), and named by its check on the rank that owns the row or key."""
    assert r is not None and r["detected"] and not r["forward"], (rank, f, r)
    first = min(s_ for _, s_ in r["steps"])
    assert [p for p in r["steps"] if p[1] == first] == [[frank, step]], (rank, f, r["steps"])
    assert check == "bwd_transit" or all(d == frank for d, _ in r["steps"]), (rank, f, r["steps"])
    owner = f.index[2] // (5 if check in ("bwd_dk", "bwd_dv", "bwd_transit") else 3)  # per key, per row
    if rank == owner:  # the per-key verdicts came home with the chunk
        assert r["flagged"][check] >= 1, (rank, f, r["flagged"])


def test_ring_needs_a_process_group():
    x = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="group:"):
        ring_attention(x, x, x)
