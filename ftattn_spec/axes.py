"""The one legend of dimension letters used everywhere in ftattn.

Every einsum string, shape comment, annotation and document in the project uses
these letters with these meanings:

====  =============================================================
B     batch
T     query sequence length (rows of S = QKᵀ)
S     key/value sequence length (columns of S)
N     query heads
K     key/value heads (N % K == 0; K == N is multi-head attention)
H     head dimension
====  =============================================================

The backends take the layout of the function they replace:

* ``ftattn_jax`` follows ``jax.nn.dot_product_attention``: query ``BTNH``,
  key and value ``BSKH``.
* ``ftattn_torch`` follows ``torch.nn.functional.scaled_dot_product_attention``:
  query ``BNTH``, key and value ``BKSH``.

Report arrays do not depend on the layout: they are always indexed by logical
(batch, head, row), (batch, head, key column) or (batch, head, head-dim column),
i.e. ``BNT``, ``BNS``, ``BNH`` or ``BN``.
"""

from __future__ import annotations

LEGEND: dict[str, str] = {
    "B": "batch",
    "T": "query sequence length",
    "S": "key/value sequence length",
    "N": "query heads",
    "K": "key/value heads",
    "H": "head dimension",
}

#: Layout of (query, key/value) per backend, in legend letters.
LAYOUTS: dict[str, tuple[str, str]] = {
    "jax": ("BTNH", "BSKH"),
    "torch": ("BNTH", "BKSH"),
}

#: Axis order of report arrays, per granularity and check orientation.
REPORT_AXES: dict[tuple[str, str], str] = {
    ("vector", "row"): "BNT",
    ("vector", "col"): "BNS",
    ("vector", "head"): "BNH",
    ("global", "row"): "BN",
    ("global", "col"): "BN",
    ("global", "head"): "BN",
}


def transpose_perm(src: str, dst: str) -> tuple[int, ...]:
    """Permutation that turns an array of layout ``src`` into layout ``dst``.

    >>> transpose_perm("BTNH", "BNTH")
    (0, 2, 1, 3)
    """
    if sorted(src) != sorted(dst):
        raise ValueError(f"layouts {src!r} and {dst!r} do not hold the same axes")
    return tuple(src.index(a) for a in dst)
