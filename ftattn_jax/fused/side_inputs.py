"""What both JAX kernels share unchanged: their side inputs (sums of K, columns of V,
computed in XLA), padding, and the one output shape every launch returns."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

F32 = jnp.float32
VCOLS = 16  # the extra MMA columns of pv_row (at least 16 for the tensor cores)
ONES_COL = 6  # vcol's column of ones: P̂·1, which softmax_exp compares with l


class KernelOutput(NamedTuple):
    """What every kernel's ``launch`` returns, padding cut off.

    ``out`` ``(B, T, N, H)``; ``qfin`` float32 ``(B, N, T)``, 1 where the query
    row is finite; ``stats`` float32 ``(B, N, T)`` arrays, (difference,
    threshold) per check run (:func:`stat_planes`), in the order ``qk_row``,
    ``softmax_dmr``, ``softmax_exp``, ``pv_row``; ``kv_finite`` whether the true keys and
    values are all finite; ``lse`` where the config asks for it.
    """

    out: Array
    qfin: Array
    stats: tuple
    kv_finite: Array
    lse: Array | None = None  # float32 (B, N, T), base 2, where the kernel saved it for its backward


def stat_planes(cfg) -> int:
    """How many arrays :class:`KernelOutput` ``stats`` holds for a kernel config (portable or
    Hopper): a difference and a threshold per check it runs."""
    return 2 * sum(bool(getattr(cfg, c, False)) for c in ("qk", "dmr", "exp", "pv"))


def _split3(x: Float[Array, "..."], dtype) -> list[Array]:
    """float32 ``x`` as hi + mid + lo in ``dtype`` (their float32 sum carries ~float32 accuracy).

    Each part passes an optimization barrier before it is widened again: XLA
    removes a float32 → float16 → float32 round trip by default
    (``xla_allow_excess_precision``; seen on an H100: ``mid`` and ``lo`` came
    out zero and ``pv_row`` flagged clean rows). ``lax.reduce_precision``
    would survive too, but it flushes parts below the normal range to zero.
    """
    parts, r = [], x
    for _ in range(3):
        part = lax.optimization_barrier(r.astype(dtype))
        parts.append(part)
        r = r - part.astype(F32)
    return parts


def _finite_from(sums, x):
    """Whether ``x`` is all finite, read off float32 sums of ``|x|`` when they are finite (a
    non-finite element makes its sum inf or NaN); otherwise (or when the sums overflowed) by
    a pass over ``x``. ``sums`` None: the pass."""
    if sums is None:
        return jnp.all(jnp.isfinite(x))
    return lax.cond(jnp.all(jnp.isfinite(sums)), lambda: jnp.asarray(True), lambda: jnp.all(jnp.isfinite(x)))


def side_inputs(k: Float[Array, "B S K H"], v: Float[Array, "B S K H"], S: int, chunk: int, qk: bool, pv: bool,
                 vcol_scale: float, prefix: bool = True, ones: bool = False):
    """``kpre`` float32 ``(B, K, C+1, 2, H)`` and ``vcol`` ``(B, K, S, 16)`` (see :mod:`.mosaic_kernel`;
    None where the check is off), and whether the first S keys and values are all finite,
    read off the same sums where the checks need them. ``vcol`` holds ``vcol_scale`` times
    the column sums (``tol.fused_vcol_scale``, a power of two: exact). ``prefix=False``:
    ``kpre`` is ``(B, K, C, 2, H)``, the sums of each chunk alone (the portable kernel adds
    those of the tiles it attends in full, :mod:`.pallas_kernel`). ``ones``: ``vcol`` also (or only) for
    its column of ones (``ONES_COL``, softmax_exp's ``P̂·1``)."""
    kpre = vcol = kabs = vabs = None
    B, Sp, K, H = k.shape
    if qk:
        C = -(-S // chunk)
        kf = k[:, :S].astype(F32)
        kf = jnp.pad(kf, ((0, 0), (0, C * chunk - S), (0, 0), (0, 0))).reshape(B, C, chunk, K, H)
        sums = jnp.stack([kf.sum(2), jnp.abs(kf).sum(2)], axis=2)  # B C 2 K H
        if prefix:
            pre = jnp.cumsum(sums, axis=1)
            pre = jnp.concatenate([jnp.zeros_like(pre[:, :1]), pre], axis=1)  # exclusive: B C+1 2 K H
            kabs = pre[:, -1, 1]  # Σ_j |k_j| per (b, kv head, h): B K H
        else:
            pre = sums
            kabs = sums[:, :, 1].sum(1)
        kpre = pre.transpose(0, 3, 1, 2, 4)
    if pv or ones:
        zeros = jnp.zeros(v.shape[:-1], v.dtype)
        parts = [zeros] * 6  # without pv_row, no pass over V for its columns
        if pv:
            vf = v.astype(F32)
            w = jnp.abs(vf).sum(-1)
            parts = _split3(vf.sum(-1) * vcol_scale, v.dtype) + _split3(w * vcol_scale, v.dtype)  # B Sp K each
            vabs = w[:, :S]
        cols = parts + [jnp.ones_like(zeros)] + [zeros] * (VCOLS - ONES_COL - 1)
        vcol = jnp.stack(cols, axis=-1).transpose(0, 2, 1, 3)  # B K Sp 16
    finite = _finite_from(kabs, k[:, :S]) & _finite_from(vabs, v[:, :S])
    return kpre, vcol, finite


def pad_to(x, axis: int, size: int):
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)
