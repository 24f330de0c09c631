"""The fault scorecard: ``python -m compare.faults``.

A seeded campaign of single-bit flips over sites × bit positions × dtypes, run
through the public ``attention(..., fault=...)`` of each backend with the same
plans, plus clean runs. Each faulty run is classified against the float64
reference and the spec's output tolerance (``ftattn_spec.reference.output_bound``):

* **detected**: the report flagged it;
* **harmless**: not flagged, and the output still meets the tolerance;
* **below limit**: not flagged, beyond the tolerance, but within the tolerance
  plus the *detection limit* (``ftattn_spec.reference.detection_limit``): the
  largest output change an error can cause while staying under the checks'
  thresholds. A checksum cannot see such an error: its own rounding noise is
  as large (float32 inputs, middle mantissa bits). Reported, not hidden;
* **missed**: not flagged, and some output element is beyond the tolerance
  plus the detection limit. The target is zero at every protected site.

JAX and PyTorch are compared on each plan: their verdicts and every flag. A
flag may differ only inside the rounding band (``AGREEMENT_BAND``): when the
fault moved a residual by less than twice its threshold, the two backends'
own rounding can put it on opposite sides of the threshold.

Detected faults are run again with ``on_fault="correct"``: the correction
succeeds when that output meets the tolerance. Single faults in S or O are
also checked for localization (``report.located`` names the injected element).
Corrupted inputs (``query``, ``key``, ``value``) are not expected to be caught:
the scorecard lists them as unprotected instead of hiding them.

``--mask`` runs every call under one mask form (the same in both backends,
drawn per trial from its seed): ``padding`` (random key lengths), ``window``
(a causal band of S/4 keys) or ``random`` (a boolean mask keeping 80% of the
scores). A fault in a masked score changes nothing and counts as harmless.

``--implementation`` runs one backend through its fused kernel, the other
through its unfused path: ``triton`` the PyTorch backend through the Triton
kernel (``attention(..., implementation="triton")``; compiled on a GPU, in
Triton's interpreter with ``TRITON_INTERPRET=1`` otherwise, which this tool
sets when no GPU is present), ``pallas`` the JAX backend through the Pallas
kernel (``attention(..., implementation="pallas")``; compiled on a GPU, in
Pallas' interpret mode otherwise, by itself). Both kernels take float16 and
bfloat16 only (float32 is left out of ``--dtype``), every ``--mask`` form, and
run the row checks only (``qk_row``, ``softmax_dmr``, ``pv_row``), so they
locate nothing: their localization is n/a. The cross-backend
comparison uses the checks both run. ``--bits`` restricts the bit positions
(the interpreters are slow). Options: ``compare.fault_options``.

The scorecard (``compare.scorecard``) keeps the raw count of every outcome; its
detection rate is over the faults that mattered (detected + below limit + missed:
a harmless fault says nothing about the checks), and every miss count comes with
the one-sided 95% Clopper–Pearson upper bound on the miss rate among them.

Prints a table, and writes under ``--out``: ``faults.json`` (options, environment,
summary, every trial, the exit status and the failed checks), ``outcomes.csv`` (per
backend, dtype, site and bit the count of each outcome) and ``faults.png`` (that
outcome map drawn; each panel titled with its misses and their 95% bound).

Exit status: 0 every check holds; 1 a check failed (a clean run flagged, or a miss
at a protected site; misses at the unprotected ``query``/``key``/``value`` are
expected); 2 a usage error (a bad option, or one this machine cannot run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np

from ftattn_spec import fault_models
from ftattn_spec import reference as ref
from ftattn_spec.faults import SITE_AXES, Fault, bit_width
from ftattn_spec.inputs import DISTRIBUTIONS, draw_qkv
from ftattn_spec.schemes import SCHEME_NAMES, SCHEMES
from ftattn_spec.shapes import PRESETS

from . import fault_options as options
from .fault_options import IMPLEMENTATIONS, UsageError
from .fault_options import parse_bits as _parse_bits
from .fault_options import parse_list as _parse_list
from . import results
from .results import output_folder
from .scorecard import (  # noqa: F401  (public here too)
    AGREEMENT_BAND,
    CAMPAIGN_SITES,
    exit_status,
    failures,
    outcome_table,
    protected,
    render,
    save_outcomes,
    summarize,
)

#: Campaign sites: the fault sites, with the DMR's second softmax as its own row.
DEFAULT_SHAPE = dict(B=3, N=4, K=2, T=24, S=40, H=16)  # every axis a different size; grouped-query
#: Clean runs cycle over the default shape and the ``cpu`` preset.
CLEAN_SHAPES = (DEFAULT_SHAPE,) + tuple(dict(B=s.B, N=s.N, K=s.kv_heads, T=s.T, S=s.S, H=s.H) for s in PRESETS["cpu"])


MASKS = ("none", "padding", "window", "random")


def mask_kwargs(kind: str, shape: dict, seed: int) -> dict:
    """The mask arguments of ``attention`` for ``--mask kind``, as NumPy arrays (logical BNTS)."""
    rng = np.random.default_rng(seed + 7)
    B, T, S = shape["B"], shape["T"], shape["S"]
    if kind == "padding":
        return {"key_value_seq_lengths": rng.integers(max(S // 2, 1), S + 1, B).astype(np.int32)}
    if kind == "window":
        return {"local_window_size": (max(S // 4, 1), 0)}
    if kind == "random":
        return {"mask": rng.random((B, 1, T, S)) < 0.8}
    return {}


def _ref_masks(masks: dict) -> dict:
    return dict(mask=masks.get("mask"), window=masks.get("local_window_size"),
                key_lengths=masks.get("key_value_seq_lengths"))


def _fault(site: str, index, bit: int) -> Fault:
    if site == "probs.replica":
        return Fault("probs", index, bit=bit, replica=1)
    return Fault(site, index, bit=bit)


def _faults(trial: dict):
    """The faults of one trial: its model's, drawn from the trial's seed."""
    model = trial.get("model", "single")
    if model == "single":
        return _fault(trial["site"], trial["index"], trial["bit"])
    site, replica = trial["site"].split(".")[0], int(trial["site"] == "probs.replica")
    return fault_models.draw(model, np.random.default_rng(trial["seed"]), site, trial["index"], trial["bit"],
                             trial["dtype"], replica)


def plan_trials(sites, dtypes, trials: int, seed: int, shape: dict, scheme: str, bits=None,
                model: str = "single") -> list[dict]:
    """The seeded list of faulty trials: ``trials`` per (dtype, site, bit); ``bits``
    (a set of bit positions, None = all) keeps only those bits; ``model`` (``fault_models.MODELS``)
    says what a trial corrupts at its site, index and bit (sites the model cannot corrupt are left
    out)."""
    allowed = fault_models.MODEL_SITES[model]
    rng = np.random.default_rng(seed)
    out = []
    for dtype in dtypes:
        for site in sites:
            if site == "probs.replica" and "softmax_dmr" not in SCHEMES[scheme].checks:
                continue
            if allowed is not None and site not in allowed:
                continue
            dims = tuple(shape[a] for a in SITE_AXES[site.split(".")[0]])
            for bit in range(bit_width(site.split(".")[0], dtype)):
                if bits is not None and bit not in bits:
                    continue
                for _ in range(trials):
                    out.append(dict(dtype=dtype, site=site, bit=bit, model=model,
                                    index=tuple(int(rng.integers(n)) for n in dims),
                                    dist=DISTRIBUTIONS[int(rng.integers(len(DISTRIBUTIONS)))],
                                    seed=int(rng.integers(2**31))))
    return out


class _Case:
    """Inputs of one trial in logical layout, their float64 reference and tolerance."""

    def __init__(self, seed: int, dist: str, dtype: str, shape: dict, is_causal: bool, backends, masks=None):
        masks = masks or {}
        qkv = draw_qkv(seed, dist, **shape)
        self.arrays = {b.name: tuple(b.array(x, dtype) for x in qkv) for b in backends}
        first = backends[0]
        q, k, v = (first.logical(x) for x in self.arrays[first.name])  # as rounded to dtype
        self.o64, p, self.logits = ref.attention(q, k, v, is_causal=is_causal, layout="torch", **_ref_masks(masks))
        self.bound = ref.output_bound(q, k, v, p, self.o64, dtype=dtype, is_causal=is_causal, layout="torch",
                                      **_ref_masks(masks))

        self.p, self.v = p, v
        self.is_causal = is_causal

    def within(self, out: np.ndarray, extra=0.0) -> bool:
        return bool(np.all(np.abs(out - self.o64) <= self.bound + extra))  # NaN is not within

    def limit(self, site: str, report) -> np.ndarray:
        thr = {n: c.threshold for n, c in report.checks.items()}
        if site == "probs.replica":  # the output never reads the second softmax
            return np.zeros_like(self.o64)
        return ref.detection_limit(site, thr, self.p, self.v, is_causal=self.is_causal, logits=self.logits)


def _flags(report) -> dict:
    return {n: np.asarray(c.flagged) for n, c in report.checks.items()}


def _ratios(report) -> dict:
    """residual / threshold per check element (NaN or overflow counts as infinite)."""
    out = {}
    for n, c in report.checks.items():
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.asarray(c.residual, np.float64) / np.asarray(c.threshold, np.float64)
        out[n] = np.where(np.isfinite(r), r, np.inf)
    return out


#: Two correct implementations may round a residual to opposite sides of its
#: threshold τ when the fault moved it by at most 2τ (the detection limit);
#: the flagging backend's residual is then at most 3τ. A disagreement inside
#: this band is rounding, one outside it is a bug.


def _common(results) -> list[str]:
    """The checks every result ran (all of them, unless an implementation runs fewer)."""
    results = list(results)
    return [n for n in results[0]["flags"] if all(n in r["flags"] for r in results[1:])]


def _explained(a: dict, b: dict) -> bool:
    """Do the flags of two backends differ only inside the rounding band (checks both ran)?"""
    for n in _common([a, b]):
        differ = a["flags"][n] != b["flags"][n]
        if np.any(differ) and not np.all(np.maximum(a["ratios"][n], b["ratios"][n])[differ] <= AGREEMENT_BAND):
            return False
    return True


def run_trial(trial: dict, backends, scheme: str, shape: dict, is_causal: bool, mask: str = "none") -> dict:
    masks = mask_kwargs(mask, shape, trial["seed"])
    case = _Case(trial["seed"], trial["dist"], trial["dtype"], shape, is_causal, backends, masks)
    fault = _faults(trial)
    row = dict(trial, index=list(trial["index"]), backends={})
    for b in backends:
        args = case.arrays[b.name]
        out, rep = b.attention(*args, scheme=scheme, is_causal=is_causal, fault=fault, **masks)
        rep = b.numpy_report(b.sync(rep))
        o = b.logical(out)
        res = {"detected": bool(rep.detected), "flags": _flags(rep), "ratios": _ratios(rep),
               "harmful": not case.within(o)}
        if res["harmful"] and not res["detected"]:
            res["beyond_limit"] = not case.within(o, case.limit(trial["site"], rep))
            res["error_over_tolerance"] = float(np.nanmax(np.abs(o - case.o64) / case.bound))
        gemm = trial["site"] if trial["site"] in ("scores", "out") else None
        if res["detected"]:
            if gemm in rep.located and trial.get("model", "single") == "single":
                b_, n_, i_, j_ = trial["index"]
                res["located"] = bool(np.array_equal(rep.located[gemm][b_, n_], [i_, j_]))
            out_c, rep_c = b.attention(*args, scheme=scheme, is_causal=is_causal, fault=fault, on_fault="correct",
                                       **masks)
            res["corrected"] = case.within(b.logical(out_c))
        row["backends"][b.name] = res
    if len(backends) > 1:
        names = [b.name for b in backends]
        first = row["backends"][names[0]]
        common = _common(row["backends"].values())
        if all(len(r["flags"]) == len(common) for r in row["backends"].values()):
            verdict = lambda r: r["detected"]  # noqa: E731
        else:  # an implementation runs fewer checks: the verdict of the checks both ran
            verdict = lambda r: any(bool(np.any(r["flags"][c])) for c in common)  # noqa: E731
            row["agree_detected"] = all(first["detected"] == row["backends"][n]["detected"] for n in names[1:])
        row["agree"] = all(verdict(first) == verdict(row["backends"][n]) for n in names[1:])
        row["agree_flags"] = all(
            all(np.array_equal(first["flags"][c], row["backends"][n]["flags"][c]) for c in common)
            for n in names[1:])
        row["agree_or_band"] = row["agree_flags"] or all(_explained(first, row["backends"][n]) for n in names[1:])
    for res in row["backends"].values():
        del res["flags"], res["ratios"]
    return row


def clean_runs(backends, scheme: str, dtypes, n_runs: int, seed: int, progress=None, mask: str = "none") -> dict:
    """``n_runs`` clean calls per backend, cycling shapes, dtypes, distributions and causality
    (under ``mask``, drawn per run)."""
    flagged = {b.name: 0 for b in backends}
    examples = []
    rng = np.random.default_rng(seed + 1)
    for r in range(n_runs):
        shape = CLEAN_SHAPES[r % len(CLEAN_SHAPES)]
        dtype = dtypes[(r // len(CLEAN_SHAPES)) % len(dtypes)]
        dist = DISTRIBUTIONS[r % len(DISTRIBUTIONS)]
        is_causal = bool((r // 2) % 2)
        s = int(rng.integers(2**31))
        qkv = draw_qkv(s, dist, **shape)
        masks = mask_kwargs(mask, shape, s)
        for b in backends:
            _, rep = b.attention(*(b.array(x, dtype) for x in qkv), scheme=scheme, is_causal=is_causal, **masks)
            if bool(b.sync(rep.detected)):
                flagged[b.name] += 1
                examples.append(dict(backend=b.name, shape=shape, dtype=dtype, dist=dist, causal=is_causal, seed=s))
        if progress:
            progress()
    return {"runs": n_runs, "flagged": flagged, "examples": examples[:20]}


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m compare.faults``, each with its help and default."""
    ap = argparse.ArgumentParser(prog="python -m compare.faults", description=__doc__.split("\n\n")[0],
                                 epilog="exit status: 0 every check holds, 1 a check failed (a clean run flagged, "
                                        "or a miss at a protected site), 2 a usage error",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--backends", default="jax,torch", help="comma-separated, from: jax, torch")
    ap.add_argument("--scheme", default="full", choices=SCHEME_NAMES, help="the checks every call runs")
    ap.add_argument("--dtype", default="float16,bfloat16,float32",
                    help="comma-separated, from: float16, bfloat16, float32")
    ap.add_argument("--sites", default=",".join(CAMPAIGN_SITES),
                    help=f"comma-separated fault sites, from: {', '.join(CAMPAIGN_SITES)}")
    ap.add_argument("--trials", type=int, default=2, help="faulty runs per (dtype, site, bit); >= 1")
    ap.add_argument("--clean", type=int, default=300, help="clean runs per backend; >= 0")
    ap.add_argument("--seed", type=int, default=0, help="seed of the trial plan and the clean runs")
    ap.add_argument("--causal", action="store_true", help="use the causal mask in the faulty runs")
    ap.add_argument("--mask", default="none", choices=MASKS,
                    help="run every call under this mask form (see the module docs)")
    ap.add_argument("--implementation", default="unfused", choices=IMPLEMENTATIONS,
                    help="unfused (both backends), triton (torch's fused kernel; JAX stays unfused) or pallas "
                         "(JAX's fused kernel; torch stays unfused): the fused ones take float16/bfloat16")
    ap.add_argument("--model", default="single", choices=tuple(fault_models.MODELS),
                    help="what a faulty run corrupts: one bit (single), 2-4 bits of one element (multi_bit), a "
                         "bit stuck at 0 or 1 over a row (stuck_row) or the whole call (stuck_call) of S, P or O")
    ap.add_argument("--bits", default=None,
                    help="comma-separated bit positions or ranges a-b within 0-31; None: every bit")
    ap.add_argument("--out", default=None, help="output folder; None: results/faults-<timestamp>/")
    return ap


def main(argv=None) -> int:
    """Run the campaign; the exit status is :func:`compare.scorecard.exit_status`'s (0 or 1). A
    usage error prints its message to stderr and raises :class:`UsageError` (exit status 2)."""
    ap = build_parser()
    args = ap.parse_args(argv)  # argparse's own usage errors exit 2
    try:
        return _campaign(args)
    except UsageError as e:
        options.report_usage_error(ap, e)
        raise


def _output_folder(args) -> str:
    """``--out`` created and writable now, not after the campaign; a bad one is a usage error."""
    path = args.out or os.path.join("results", "faults-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    try:
        return output_folder(path)
    except UsageError:
        raise
    except SystemExit as e:
        raise UsageError(str(e.code)) from None


def _campaign(args) -> int:
    names = _parse_list(args.backends, ("jax", "torch"), "backends")
    dtypes = _parse_list(args.dtype, ("float16", "bfloat16", "float32"), "dtype")
    sites = _parse_list(args.sites, CAMPAIGN_SITES, "sites")
    bits = _parse_bits(args.bits)
    if args.trials < 1:
        raise UsageError(f"--trials: expected an integer >= 1, got {args.trials}")
    if args.clean < 0:
        raise UsageError(f"--clean: expected an integer >= 0, got {args.clean}")
    dtypes, dropped = options.restrict_dtypes(args.implementation, dtypes, args.dtype)
    trials = plan_trials(sites, dtypes, args.trials, args.seed, DEFAULT_SHAPE, args.scheme, bits, args.model)
    if not trials:
        raise UsageError(f"--sites, --bits, --dtype: expected a selection with at least one faulty trial, got "
                         f"--sites {args.sites!r}, --bits {args.bits!r}, --dtype {args.dtype!r}")
    options.setup_implementation(args, names)  # before anything imports triton: may set TRITON_INTERPRET
    out_dir = _output_folder(args)  # checked now, not after the campaign: a bad --out fails in a second
    impl_of = options.backend_implementations(args.implementation, names)

    from rich.console import Console
    from rich.progress import Progress

    from . import backends as adapters

    console = Console(width=None if sys.stdout.isatty() else 150)
    bks = []
    for n in names:
        try:
            bks.append(adapters.make_backend(n, impl_of[n]))
        except ImportError as e:
            console.print(f"[yellow]skipping backend {n}: {e}[/yellow]")
    if not bks:
        raise UsageError(f"--backends: expected a backend that can be imported here, got {args.backends!r}")
    if args.implementation != "unfused":
        console.print(options.implementation_header(args.implementation, bks, args.scheme, dtypes, dropped),
                      markup=False, highlight=False)
    start = time.perf_counter()
    rows = []
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("faulty runs", total=len(trials))
        for t in trials:
            rows.append(run_trial(t, bks, args.scheme, DEFAULT_SHAPE, args.causal, args.mask))
            bar.advance(task)
        task2 = bar.add_task("clean runs", total=args.clean)
        clean = clean_runs(bks, args.scheme, dtypes, args.clean, args.seed, progress=lambda: bar.advance(task2),
                           mask=args.mask)
    summary = summarize(rows, clean, [b.name for b in bks], args.scheme, {b.name: b.implementation for b in bks})
    render(summary, console)
    failed = failures(summary)
    status = exit_status(summary)
    # the schema of every compare command (compare.results): its rows are the outcome map's
    doc = results.document("faults", dict(vars(args), shape=DEFAULT_SHAPE, clean_shapes=CLEAN_SHAPES, dtypes=dtypes,
                                          implementations={b.name: b.implementation for b in bks}),
                           {b.name: b.environment() for b in bks}, summary["outcomes"])
    doc.update({"seconds": round(time.perf_counter() - start, 1), "exit_status": status, "failures": failed,
                "summary": summary, "clean": clean, "trials": rows})
    with open(os.path.join(out_dir, "faults.json"), "w") as f:
        json.dump(doc, f, indent=1, default=lambda x: x.item() if hasattr(x, "item") else str(x))
    save_outcomes(summary["outcomes"], out_dir, "faults.png", title="forward fault outcomes")
    console.print(f"wrote {out_dir}/faults.json, outcomes.csv and faults.png in {doc['seconds']} s")
    for line in failed:
        console.print(f"[red]check failed:[/red] {line}")
    console.print(f"exit status {status}: " + ("every check holds" if not status else f"{len(failed)} check(s) failed"))
    return status


if __name__ == "__main__":
    sys.exit(main())
