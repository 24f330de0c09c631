"""The fused backward's settings and side inputs (:mod:`.pallas_backward` runs the kernels).

:class:`BackwardBlocks` (tiles; ``ftattn_spec.backward_blocks``, shared with PyTorch), :class:`BackwardConfig` (the
static settings of one compilation, made by :func:`backward_config` from the forward's), and
:func:`side_sums`: what the kernels read besides Q, K, V, O, dO and the log-sum-exp, computed
in XLA: ``D_i = Σ_h dO_ih·O_ih``; with the checks, the block sums of Q, |Q|, dO, |dO| (per
query block) and of K, |K|, V, |V| (per key block), the ``W``-column weights of the gradients'
checks (per row Σ_h q, Σ_h |q|, Σ_h dO, Σ_h |dO|, per key Σ_h k, Σ_h |k|, Σ_h |v|, each scaled
by σ and split into three parts of the input dtype; a column of ones; ‖dO_i‖∞ in column 13),
and the bounds of ``bwd_ds_col``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ftattn_spec import backward_tolerances as btol
from ftattn_spec import masking
from ftattn_spec.backward_blocks import BackwardBlocks
from ftattn_spec.backward_tolerances import BackwardCoefficients

from .side_inputs import _split3

F32 = jnp.float32
W = 16  # the weights' columns


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    """Static settings of one backward compilation."""

    T: int
    S: int
    G: int
    scale: float
    causal: bool
    block_m: int
    block_n: int
    checks: bool
    n_faults: int
    coef: BackwardCoefficients
    num_warps: int
    num_stages: int
    interpret: bool
    window: tuple[int, int] | None = None
    has_mask: bool = False
    has_bias: bool = False
    has_qlen: bool = False
    has_klen: bool = False
    debug: bool = False  # Pallas prints the kernels' jaxpr and Triton IR when it lowers them
    #: one block of a larger call (a step of ring attention): the gradients stay float32 and
    #: ``bwd_softmax`` returns each row's signed Σ p (no target: the caller adds the blocks')
    partial: bool = False
    #: the forward's tiles' width in keys (``bwd_softmax``'s threshold counts the forward's sums of l)
    forward_block_n: int = 0

    @property
    def band(self) -> tuple[int, int]:
        return masking.band(self.window, self.causal)


def backward_config(fwd, H: int, dtype: str, *, checks: bool, blocks: BackwardBlocks | None = None,
                    forward_block_n: int | None = None, partial: bool = False) -> BackwardConfig:
    """The backward's settings for a forward ``Config`` ``fwd`` of the portable kernel."""
    bs = blocks or BackwardBlocks.get_default(fwd.interpret)
    forward_block_n = forward_block_n or fwd.block_n
    return BackwardConfig(
        T=fwd.T, S=fwd.S, G=fwd.G, scale=fwd.scale, causal=fwd.causal, block_m=bs.block_m, block_n=bs.block_n,
        checks=checks, n_faults=fwd.n_faults,
        # per query head: the key checks sum one head's rows (G = 1)
        coef=btol.backward_coefficients(fwd.T, fwd.S, H, 1, dtype, bs.block_m, bs.block_n,
                                        forward_block_n),
        num_warps=bs.num_warps, num_stages=bs.num_stages, interpret=fwd.interpret, window=fwd.window,
        has_mask=fwd.has_mask, has_bias=fwd.has_bias, has_qlen=fwd.has_qlen, has_klen=fwd.has_klen,
        partial=partial, forward_block_n=forward_block_n)


class Sums(NamedTuple):
    """The side inputs of :func:`side_sums` (the last four None without the checks)."""

    dd: jax.Array  # float32 (B, N, Tp)
    rb: jax.Array | None  # float32 (B, N, Tp/BM, 4, H): Σ q, Σ |q|, Σ dO, Σ |dO| per query block
    wq: jax.Array | None  # (B, N, Tp, 16), input dtype; column 13: ‖dO_i‖∞
    kb: jax.Array | None  # float32 (B, K, Sp/BN, 4, H): Σ k, Σ |k|, Σ v, Σ |v| per key block
    wk: jax.Array | None  # (B, K, Sp, 16), input dtype
    vmax: jax.Array | None  # float32 (B, K): max_j Σ_h |v_jh| (bwd_ds_col's bound on |D|)
    totdo: jax.Array | None  # float32 (B, N): Σ_i ‖dO_i‖∞ (bwd_ds_col's allowance for P̃'s underflow)


def _weights(x, y, z, sigma: float, dtype, last=None):
    """Per row (axis -1 summed): σ·Σ x, σ·Σ |x|, σ·Σ y, σ·Σ |z|, three parts each, then ones, then
    ``last`` (or zeros) in column 13."""
    cols = []
    for s in (x.sum(-1), jnp.abs(x).sum(-1), y.sum(-1), jnp.abs(z).sum(-1)):
        cols += _split3(s * sigma, dtype)
    one = jnp.ones_like(cols[0])
    zero = jnp.zeros_like(cols[0])
    return jnp.stack(cols + [one, zero if last is None else last.astype(dtype)] + [zero] * (W - 14), axis=-1)


def _block_sums(x, block: int):
    """``x`` ``(B, L, M, H)`` float32 → ``(B, M, L/block, 4... )``: Σ x and Σ |x| per block of L."""
    B, L, M, H = x.shape
    xb = x.reshape(B, L // block, block, M, H)
    return jnp.stack([xb.sum(2), jnp.abs(xb).sum(2)], axis=2).transpose(0, 3, 1, 2, 4)  # B M L/block 2 H


def side_sums(q, k, v, o, do, cfg: BackwardConfig) -> Sums:
    """The backward's side inputs from padded ``(B, Tp, N, H)`` and ``(B, Sp, K, H)`` arrays."""
    dof, of = do.astype(F32), o.astype(F32)
    dd = jnp.sum(dof * of, -1).transpose(0, 2, 1)
    if not cfg.checks:
        return Sums(dd, None, None, None, None, None, None)
    qf, kf, vf = q.astype(F32), k.astype(F32), v.astype(F32)
    sigma = cfg.coef.sigma
    rb = jnp.concatenate([_block_sums(qf, cfg.block_m), _block_sums(dof, cfg.block_m)], axis=3)
    kb = jnp.concatenate([_block_sums(kf, cfg.block_n), _block_sums(vf, cfg.block_n)], axis=3)
    do_max = jnp.max(jnp.abs(do), axis=-1)  # B Tp N, in the input dtype (exact)
    wq = _weights(qf, dof, dof, sigma, q.dtype, do_max).transpose(0, 2, 1, 3)  # B N Tp 16
    wk = _weights(kf, jnp.abs(vf), vf, sigma, k.dtype).transpose(0, 2, 1, 3)  # B K Sp 16
    vmax = jnp.max(jnp.abs(vf).sum(-1), axis=1)  # B K (padding rows are zero)
    totdo = do_max.astype(F32).sum(1)  # B N
    return Sums(dd, rb, wq, kb, wk, vmax, totdo)
