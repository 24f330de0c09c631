"""The fused backward's fault scorecard: ``python -m compare.backward_faults``.

Single-bit flips at every site of the fused backward (``ftattn_spec.faults.BACKWARD_SITES``;
``bwd_scores``, ``bwd_probs``, ``bwd_dp`` and ``bwd_ds`` in both kernels: replica 0 the dQ
kernel's, 1 the dK/dV kernel's) over chosen bit positions and dtypes, through the public
``attention(..., fault=...)`` of each backend's fused kernel (PyTorch ``"triton"``, JAX
``"pallas"``; compiled on a GPU, interpreted on a CPU), then ``jax.grad`` or
``torch.autograd``. Each faulty backward is classified against the same call's clean
gradients and a tolerance from the data (as the tests do, FlashAttention's rule): three times
the error of a low-precision reference (plain attention in the input dtype) against float64,
per gradient.

* **detected**: the backward's verdict (the counters under ``<site> (backward)``) says so;
* **harmless**: not detected, and every gradient is still within the tolerance of float64;
* **missed**: not detected, and some gradient is beyond it. The target is zero.

Clean backwards are run as well: any detection there is a false positive. Prints a table (the
raw count of each outcome, and every miss count with the one-sided 95% Clopper–Pearson upper
bound on the miss rate among the faults that mattered, detected + missed: harmless faults say
nothing about the checks; ``compare.scorecard.miss_upper_bound``), and writes under ``--out``
``backward_faults.json`` (options, every run, the summary with the bounds, the outcome map),
``outcomes.csv`` (per backend, dtype, site and bit the count of each outcome) and
``backward_faults.png`` (that outcome map drawn). Exit status: 0 when nothing was missed and
nothing clean was flagged, 1 otherwise, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import numpy as np

from ftattn_spec.faults import BACKWARD_SITES, REPLICA_SITES, Fault

from .fault_options import UsageError, parse_bits, parse_list, report_usage_error
from .results import document
from .scorecard import BACKWARD_OUTCOMES, DEFINITIONS, bound_text, mattered, miss_rate, save_outcomes

SHAPE = dict(B=2, N=4, K=2, T=24, S=20, H=16)  # every axis a different size
RATIO = 3.0
DEFAULT_BITS = "30,27,24,22,18"
KEY_SITES = ("bwd_dk", "bwd_dv")  # index (b, kv head, key, h)
ROW_SITES = ("bwd_dq",)  # index (b, head, row, h)


def combos(sites) -> list[tuple[str, int]]:
    """``(site, replica)`` for every site, both replicas where a site is computed twice."""
    return [(s, r) for s in sites for r in ((0, 1) if s in REPLICA_SITES else (0,))]


def fault_index(site: str, rng, shape: dict, is_causal: bool) -> tuple[int, int, int, int]:
    B, N, K, T, S, H = (shape[a] for a in "BNKTSH")
    if site in KEY_SITES:
        return int(rng.integers(B)), int(rng.integers(K)), int(rng.integers(S)), int(rng.integers(H))
    i = int(rng.integers(T))
    if site in ROW_SITES:
        return int(rng.integers(B)), int(rng.integers(N)), i, int(rng.integers(H))
    j = int(rng.integers(min(i, S - 1) + 1 if is_causal else S))  # an attended entry
    return int(rng.integers(B)), int(rng.integers(N)), i, j


def inputs(seed: int, shape: dict):
    """``q, k, v, dO`` float32 in the logical layout ``B N T H`` (``B K S H``)."""
    rng = np.random.default_rng(seed)
    B, N, K, T, S, H = (shape[a] for a in "BNKTSH")
    return (rng.standard_normal((B, N, T, H)), rng.standard_normal((B, K, S, H)),
            rng.standard_normal((B, K, S, H)), rng.standard_normal((B, N, T, H)))


# ---- the two backends: gradients (float64, logical layout) and the backward's detections


def torch_grads(q, k, v, g, dtype: str, is_causal: bool, fault=None, implementation="triton"):
    import torch

    import ftattn_torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = getattr(torch, dtype)
    xs = [torch.from_numpy(np.asarray(x)).to(dev, dt).requires_grad_(True) for x in (q, k, v)]
    ftattn_torch.counters.reset()
    out, _ = ftattn_torch.attention(*xs, is_causal=is_causal, implementation=implementation, fault=fault,
                                    site="campaign")
    grads = torch.autograd.grad(out, xs, torch.from_numpy(np.asarray(g)).to(dev, dt))
    det = ftattn_torch.counters.read().get("campaign (backward)", {}).get("detected", 0)
    return [x.double().cpu().numpy() for x in grads], det


def jax_grads(q, k, v, g, dtype: str, is_causal: bool, fault=None, implementation="pallas"):
    import jax
    import jax.numpy as jnp

    import ftattn_jax

    t = lambda x: jnp.asarray(np.ascontiguousarray(np.asarray(x).transpose(0, 2, 1, 3)), dtype)  # noqa: E731
    gt = t(g).astype(jnp.float32)

    def loss(q, k, v):
        out = ftattn_jax.attention(q, k, v, is_causal=is_causal, implementation=implementation, fault=fault,
                                   site="campaign")[0]
        return jnp.sum(out.astype(jnp.float32) * gt)

    ftattn_jax.counters.reset()
    grads = jax.grad(loss, argnums=(0, 1, 2))(t(q), t(k), t(v))
    det = ftattn_jax.counters.read().get("campaign (backward)", {}).get("detected", 0)
    return [np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in grads], det


BACKENDS = {"torch": torch_grads, "jax": jax_grads}


def exact_grads(q, k, v, g, dtype: str, is_causal: bool):
    """float64 gradients of plain attention from the ``dtype``-rounded inputs, and those of the
    low-precision reference (every product and P in ``dtype``, float32 softmax)."""
    import torch

    rnd = [torch.from_numpy(np.asarray(x)).to(getattr(torch, dtype)) for x in (q, k, v, g)]
    outs = []
    for work in (torch.float64, getattr(torch, dtype)):
        xs = [x.to(work).requires_grad_(True) for x in rnd[:3]]
        qq, kk, vv = xs
        G = qq.shape[1] // kk.shape[1]
        s = (qq @ kk.repeat_interleave(G, 1).transpose(-1, -2)) * qq.shape[-1] ** -0.5
        if is_causal:
            T, S = s.shape[-2:]
            s = s.masked_fill(torch.ones(T, S, dtype=torch.bool).triu(1), -torch.inf)
        p = torch.softmax(s.to(torch.float64 if work == torch.float64 else torch.float32), -1).to(work)
        out = p @ vv.repeat_interleave(G, 1)
        outs.append([x.double().numpy() for x in torch.autograd.grad(out, xs, rnd[3].to(work))])
    return outs


def classify(grads, det: int, exact, low) -> tuple[str, float]:
    """The outcome of one faulty run and its largest error over the tolerance."""
    worst = 0.0
    for a, e, lo in zip(grads, exact, low):
        tol = RATIO * max(float(np.abs(lo - e).max()), float(np.abs(e).max()) * 2.0 ** -10)
        err = float(np.abs(a - e).max()) if np.isfinite(a).all() else float("inf")
        worst = max(worst, err / tol)
    if det:
        return "detected", worst
    return ("harmless" if worst <= 1.0 else "missed"), worst


def parse_shape(text: str) -> dict:
    """``"B=2,N=4,..."`` -> a full shape dict; :class:`UsageError` (exit status 2) otherwise."""
    shape = dict(SHAPE)
    for part in filter(None, text.split(",")):
        name, _, n = part.partition("=")
        if name.strip() not in SHAPE or not n.strip().isdigit() or int(n) < 1:
            raise UsageError(f"--shape: expected a=n pairs with a in {','.join(SHAPE)} and n >= 1, got {part!r}")
        shape[name.strip()] = int(n)
    if shape["N"] % shape["K"]:
        raise UsageError(f"--shape: expected N a multiple of K, got N={shape['N']}, K={shape['K']}")
    return shape


def site_label(site: str, replica: int) -> str:
    """A site's name in the outcome map: ``bwd_ds.r1`` where the site is computed twice."""
    return f"{site}.r{replica}" if site in REPLICA_SITES else site


def outcome_table(results: list[dict]) -> list[dict]:
    """The outcome map's data: one dict per (backend, dtype, site, bit) of the faulty runs in
    ``results`` with ``backend, dtype, site`` (:func:`site_label`), ``bit``, the count of each of
    ``compare.scorecard.BACKWARD_OUTCOMES`` and ``trials`` (their sum), in the order run."""
    cells = {}
    for r in results:
        if r["kind"] == "fault":
            key = (r["backend"], r["dtype"], site_label(r["site"], r["replica"]), r["bit"])
            cells.setdefault(key, dict.fromkeys(BACKWARD_OUTCOMES, 0))[r["outcome"]] += 1
    backends = list(dict.fromkeys(k[0] for k in cells))
    return [dict(backend=k[0], dtype=k[1], site=k[2], bit=k[3], **c, trials=sum(c.values()))
            for k, c in sorted(cells.items(), key=lambda kv: backends.index(kv[0][0]))]


def summarize(results: list[dict]) -> dict:
    """Per (backend, dtype, site, replica) and in total: the count of each outcome, the faults
    that mattered (detected + missed) and the misses with their 95% upper bound among those;
    the clean runs and how many were flagged (false positives)."""
    groups = {}
    for r in results:
        if r["kind"] == "fault":
            key = (r["backend"], r["dtype"], r["site"], r["replica"])
            groups.setdefault(key, dict.fromkeys(BACKWARD_OUTCOMES, 0))[r["outcome"]] += 1
    rows = [dict(backend=b, dtype=d, site=s, replica=rep, **c, trials=sum(c.values()), mattered=mattered(c),
                 miss=miss_rate(c["missed"], mattered(c))) for (b, d, s, rep), c in groups.items()]
    total = {c: sum(r[c] for r in rows) for c in BACKWARD_OUTCOMES}
    clean = [r for r in results if r["kind"] == "clean"]
    return dict(definitions=DEFINITIONS, rows=rows, **total, trials=sum(total.values()), mattered=mattered(total),
                miss=miss_rate(total["missed"], mattered(total)),
                clean={"runs": len(clean), "flagged": sum(1 for r in clean if r["detected"])})


def exit_status(summary: dict) -> int:
    """0 when no fault was missed and no clean run flagged, 1 otherwise (every backward site is
    checked: a miss anywhere fails)."""
    return 1 if summary["missed"] or summary["clean"]["flagged"] else 0


def print_summary(summary: dict) -> None:
    """The table: per row the raw counts and the misses with their 95% upper bound; the totals."""
    print(f"{'backend':7s} {'dtype':8s} {'site':10s} {'replica':7s} {'detected':>8s} {'harmless':>8s} "
          f"{'missed (≤ 95% bound)':>22s}")
    for r in summary["rows"]:
        m = r["miss"]
        missed = f"{m['count']} (≤ {100 * m['upper95']:.3g}%)" if m["of"] else f"{m['count']} (of 0)"
        print(f"{r['backend']:7s} {r['dtype']:8s} {r['site']:10s} {r['replica']:7d} {r['detected']:8d} "
              f"{r['harmless']:8d} {missed:>22s}")
    print("missed (≤ x%): the one-sided 95% Clopper–Pearson upper bound on the miss rate among the faults that "
          "mattered (detected + missed; harmless faults excluded)")
    print(f"\n{summary['trials']} faulty backwards, {summary['mattered']} of which mattered "
          f"({summary['harmless']} harmless): {bound_text(summary['missed'], summary['mattered'])}; "
          f"{summary['clean']['runs']} clean: {summary['clean']['flagged']} flagged")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compare.backward_faults", description=__doc__.split("\n\n")[0],
                                 epilog="exit status: 0 nothing missed and no clean run flagged, 1 otherwise, "
                                        "2 a usage error",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--backends", default="torch,jax", help="comma-separated, from: torch, jax")
    ap.add_argument("--dtype", default="float16,bfloat16", help="comma-separated, from: float16, bfloat16")
    ap.add_argument("--sites", default=",".join(BACKWARD_SITES),
                    help=f"comma-separated backward sites, from: {', '.join(BACKWARD_SITES)}")
    ap.add_argument("--bits", default=DEFAULT_BITS, help="comma-separated bit positions or ranges a-b within 0-31")
    ap.add_argument("--trials", type=int, default=1, help="faulty runs per (backend, dtype, site, replica, bit); >= 1")
    ap.add_argument("--clean", type=int, default=2, help="clean runs per backend and dtype; >= 0")
    ap.add_argument("--seed", type=int, default=0, help="seed of the trial plan")
    ap.add_argument("--causal", action="store_true", help="causal attention")
    ap.add_argument("--shape", default=",".join(f"{a}={n}" for a, n in SHAPE.items()),
                    help="B,N,K,T,S,H as a=n pairs; N a multiple of K")
    ap.add_argument("--out", default=None, help="output folder; None: results/backward-faults-<timestamp>/")
    try:
        args = ap.parse_args(argv)
        backends = parse_list(args.backends, BACKENDS, "backends")
        dtypes = parse_list(args.dtype, ("float16", "bfloat16"), "dtype")
        sites = parse_list(args.sites, BACKWARD_SITES, "sites")
        bits = sorted(parse_bits(args.bits))
        shape = parse_shape(args.shape)
        if args.trials < 1:
            raise UsageError(f"--trials: expected an integer >= 1, got {args.trials}")
        if args.clean < 0:
            raise UsageError(f"--clean: expected an integer >= 0, got {args.clean}")
    except UsageError as e:  # an option's: its message, then 2
        report_usage_error(ap, e)
        return 2
    except SystemExit as e:  # argparse's (--help: 0; a usage error: 2, its message printed)
        return 2 if e.code else 0
    if "torch" in backends:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    rng = np.random.default_rng(args.seed)
    results = []
    for dtype in dtypes:
        for n in range(args.clean):
            q, k, v, g = inputs(args.seed * 1000 + n, shape)
            for b in backends:
                _, det = BACKENDS[b](q, k, v, g, dtype, args.causal)
                results.append(dict(kind="clean", backend=b, dtype=dtype, detected=int(det)))
        for site, replica in combos(sites):
            for bit in bits:
                for trial in range(args.trials):
                    seed = int(rng.integers(2**31))
                    q, k, v, g = inputs(seed, shape)
                    exact, low = exact_grads(q, k, v, g, dtype, args.causal)
                    fault = Fault(site, fault_index(site, np.random.default_rng(seed), shape, args.causal), bit=bit,
                                  replica=replica)
                    for b in backends:
                        grads, det = BACKENDS[b](q, k, v, g, dtype, args.causal, fault)
                        outcome, worst = classify(grads, det, exact, low)
                        results.append(dict(kind="fault", backend=b, dtype=dtype, site=site, replica=replica,
                                            bit=bit, index=list(fault.index), outcome=outcome, worst=worst))
                        print(f"{b:5s} {dtype:8s} {site:10s} r{replica} bit {bit:2d}: {outcome:8s} "
                              f"(largest error {worst:.3g}× the tolerance)", flush=True)
    summary = summarize(results)
    print()
    print_summary(summary)
    status = exit_status(summary)
    out = args.out or os.path.join("results", "backward-faults-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    table = outcome_table(results)
    with open(os.path.join(out, "backward_faults.json"), "w") as f:
        doc = document("backward-faults", dict(vars(args), shape=shape, bits=bits), {}, table)
        doc.update(exit_status=status, summary=summary, outcomes=table, results=results)
        json.dump(doc, f, indent=1)
    if table:
        save_outcomes(table, out, "backward_faults.png", BACKWARD_OUTCOMES, title="backward fault outcomes")
    print(f"wrote {out}/backward_faults.json" + (", outcomes.csv and backward_faults.png" if table else ""))
    print(f"exit status {status}: " + ("nothing missed, no clean run flagged" if not status else "a check failed"))
    return status


if __name__ == "__main__":
    sys.exit(main())
