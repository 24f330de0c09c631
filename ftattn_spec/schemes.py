"""The scheme catalogue: which checks each scheme runs, and where it came from.

Scheme, check and granularity names are public API; both backends accept
exactly these strings.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Checks, in the order a scheme runs them.
CHECKS: tuple[str, ...] = ("qk_row", "qk_col", "softmax_dmr", "softmax_exp", "pv_row", "pv_col")

#: What each check compares, in words (used by docs and the report renderer).
CHECK_DESCRIPTIONS: dict[str, str] = {
    "qk_row": "row sums of S = scale·QKᵀ against scale·Q·(Σ over keys of k)",
    "qk_col": "column sums of S against scale·(Σ over queries of q)·Kᵀ",
    "softmax_dmr": "two independent softmax evaluations of the same S, compared",
    "softmax_exp": "per row and tile of keys, Σ log₂ p (exponent fields plus the log of the mantissas' product) "
                   "against Σ of the exponentials' arguments, formed a second time",
    "pv_row": "row sums of O = P·V against P·(V·1)",
    "pv_col": "column sums of O = P·V against (1ᵀP)·V",
}

#: Orientation of each check's vector-granularity arrays: per query row
#: (``BNT``), per key column of S (``BNS``) or per head-dim column of O (``BNH``).
CHECK_ORIENTATION: dict[str, str] = {
    "qk_row": "row",
    "qk_col": "col",
    "softmax_dmr": "row",
    "softmax_exp": "row",
    "pv_row": "row",
    "pv_col": "head",
}

#: The backward's checks (the fused kernels' and the ring's; docs/tolerances.md) and the axis
#: their flags run along: per query row ``(B, N, T)``, per key ``(B, N|K, S)``, or one per head
#: ``(B, N)`` (``bwd_softmax_kv``). They are not part of a scheme; a tally can name them.
BACKWARD_CHECK_ORIENTATION: dict[str, str] = {
    "bwd_qk_row": "row", "bwd_dp_row": "row", "bwd_softmax": "row", "bwd_dq": "row", "bwd_d": "row",
    "bwd_ds": "row",
    "bwd_qk_col": "col", "bwd_dp_col": "col", "bwd_dk": "col", "bwd_dv": "col", "bwd_ds_col": "col",
    "bwd_softmax_col": "col", "bwd_transit": "col",
    "bwd_softmax_kv": "head",
}

#: Every check a verdict can name: the forward's, then the backward's.
NAMED_CHECKS: tuple[str, ...] = CHECKS + tuple(BACKWARD_CHECK_ORIENTATION)

#: ``CHECK_ORIENTATION`` and ``BACKWARD_CHECK_ORIENTATION`` together.
ANY_CHECK_ORIENTATION: dict[str, str] = {**CHECK_ORIENTATION, **BACKWARD_CHECK_ORIENTATION}

GRANULARITIES: tuple[str, ...] = ("vector", "global")


@dataclass(frozen=True)
class Scheme:
    name: str
    checks: tuple[str, ...]
    notebook_cells: tuple[str, ...]
    summary: str


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme(
            "baseline",
            (),
            ("Baseline_final", "warm up", "change the loop order", "10 times average"),
            "plain attention, no checks",
        ),
        Scheme(
            "dmr_softmax",
            ("softmax_dmr",),
            ("DMR_final", "DMR_with check", "DMR_optimize"),
            "softmax computed twice, independently, and compared",
        ),
        Scheme(
            "abft_qk_col",
            ("qk_col",),
            ("ABFT_GEMM_1", "ABFT_GEMM1_elementcheck", "ABFT_optimize"),
            "column checksum of S = QKᵀ",
        ),
        Scheme(
            "abft_qk_row",
            ("qk_row",),
            ("attention with all ft technique (QKᵀ part)",),
            "row checksum of S = QKᵀ",
        ),
        Scheme(
            "abft_pv_row",
            ("pv_row",),
            ("ABFT_GEMM_2",),
            "row checksum of O = PV",
        ),
        Scheme(
            "abft_softmax",
            ("softmax_exp",),
            (),
            "the exponential checksum of the softmax: exp2 turns the sum of the arguments into the product "
            "of the probabilities (no second exponential)",
        ),
        Scheme(
            "abft_all",
            ("qk_row", "qk_col", "softmax_exp", "pv_row", "pv_col"),
            (),
            "every checksum and no replica: the GEMMs' row and column checksums and the exponential checksum",
        ),
        Scheme(
            "full",
            ("qk_row", "qk_col", "softmax_dmr", "pv_row", "pv_col"),
            ("attention with all ft technique",),
            "every check: row and column checksums on both GEMMs (so a single bad element of S or O is "
            "located), and the softmax DMR",
        ),
    )
}

SCHEME_NAMES: tuple[str, ...] = tuple(SCHEMES)
