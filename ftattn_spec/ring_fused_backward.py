"""The ring's backward by the fused kernels: its checks and the thresholds of what it judges over
all steps, for both backends (``ftattn_torch.ring_fused_backward``, ``ftattn_jax.ring_fused_backward``).

Each step's block is one launch of the fused backward (the Triton kernels in PyTorch, the
portable Pallas kernels in JAX), fed the forward's merged log-sum-exp, so that P is recomputed
tile by tile and never stored. A launch judges its own products (the row checks but
``bwd_softmax``, and the key checks, with ``ftattn_spec.backward_tolerances``'s thresholds for the
block's ``Tc × Sc``). What no block can judge alone is judged after the last step:

* ``bwd_softmax``: each row's Σ p (the launch returns it signed, with no target), added over the
  steps, against 1 (:func:`softmax_threshold`);
* ``bwd_softmax_kv``: the dK/dV kernel's totals of P per (batch, kv head), added over the steps,
  against the rows attended (:func:`group_threshold`).

``bwd_transit`` (the accumulators' travelling row sums) is as in the unfused ring backward
(``ftattn_spec.ring_backward``). docs/tolerances.md, "With fused blocks".
"""

from __future__ import annotations

import math

from . import backward_tolerances as btol
from . import ring as spec_ring
from . import tolerances as tol

#: The checks, per query row ``(B, N, Tc)``, per key ``(B, K, Sc)``, per (batch, kv head) ``(B, K)``.
ROW_CHECKS: tuple[str, ...] = ("bwd_qk_row", "bwd_dp_row", "bwd_softmax", "bwd_dq", "bwd_d", "bwd_ds")
KERNEL_KEY_CHECKS: tuple[str, ...] = ("bwd_qk_col", "bwd_dp_col", "bwd_dk", "bwd_dv", "bwd_ds_col", "bwd_softmax_col")
KEY_CHECKS: tuple[str, ...] = KERNEL_KEY_CHECKS + ("bwd_transit",)
GROUP_CHECKS: tuple[str, ...] = ("bwd_softmax_kv",)
CHECKS: tuple[str, ...] = ROW_CHECKS + KEY_CHECKS + GROUP_CHECKS


def softmax_threshold(S: int, P: int, H: int, dtype: str, block_m: int, block_n: int, forward_block_n: int,
                      lse2, total):
    """Bound on ``|Σ_r Σ_j p_ij − 1|`` over the ``P`` steps' ``S`` keys in all (any array type),
    ``lse2`` the merged log-sum-exp in the kernels' base-2 units (0 on a row that attends
    nothing), ``total`` the computed sum; tiles of ``block_m × block_n``, the forward's
    ``forward_block_n`` keys wide.

    One launch's bound over all ``S`` keys (``backward_tolerances.softmax_coefficients``: each
    exponential, the forward's sum of l over its tiles, the backward's sum over its tiles), plus
    what the ring adds: the ``P`` partial sums added (``γ(P + 1)`` of the total) and the merges
    of the forward's blocks, whose log-sum-exp is off by ``P·weight_threshold(|lse|)``, relative
    to the total since ``∂p/∂lse = −p`` (``ftattn_spec.ring.weight_threshold``)."""
    c = btol.backward_coefficients(1, S, H, 1, dtype, block_m, block_n, forward_block_n)
    ring = tol.gamma(P + 1) + P * spec_ring.weight_threshold(abs(lse2) * math.log(2.0))
    return c.softmax0 + c.softmax_mu * abs(lse2) + c.allow_row + tol.MAGNITUDE_MARGIN * ring * abs(total)


def group_threshold(rows_threshold, attended, *, Tc: int, Sc: int, P: int, G: int, block_m: int, block_n: int):
    """Bound on ``|Σ P − attended|`` of one (batch, kv head) over the ``P`` steps: ``rows_threshold``
    the sum of its rows' :func:`softmax_threshold` (twice: the same terms summed in another
    order), plus the reordering of the total, relative to ``attended`` (the rows that attend a
    key): a tile's ``γ(block_m·block_n)``, the chain over a chunk's key tiles and the steps,
    the sum over the group's ``G·Tc`` rows."""
    order = tol.gamma(block_m * block_n) + tol.gamma(-(-Sc // block_n) * P + 1) + tol.gamma(G * Tc + 1)
    return 2.0 * rows_threshold + order * attended


__all__ = ["ROW_CHECKS", "KERNEL_KEY_CHECKS", "KEY_CHECKS", "GROUP_CHECKS", "CHECKS", "softmax_threshold",
           "group_threshold"]
