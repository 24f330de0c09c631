"""Masks and biases: what may be attended, and what the logits add.

Both backends accept the same five forms, in the logical logits layout ``BNTS``
(``jax.nn.dot_product_attention`` and ``scaled_dot_product_attention`` agree
on it):

* ``mask``: boolean, True where query ``i`` may attend key ``j``, of rank at
  most 4 and broadcastable to ``(B, N, T, S)`` (missing leading axes are 1);
* ``bias``: floating, added to the logits ``scale·QKᵀ`` before the softmax,
  same broadcasting (``-inf`` entries remove a key, like a mask, but are not
  excluded from the checksums: S is checked before the bias is added);
* ``is_causal``: query ``i`` attends keys ``j <= i`` (upper-left aligned);
* ``local_window_size = (left, right)``: query ``i`` attends keys
  ``i - left <= j <= i + right`` (an int ``w`` means ``(w, w)``);
* ``query_seq_lengths`` / ``key_value_seq_lengths``: integer ``(B,)``; rows
  ``i >= Tq_b`` and keys ``j >= Skv_b`` are masked.

All of them are combined by logical AND into one boolean ``allowed``. Masked
entries are excluded from both sides of the S checksums and get probability
zero. A row with no allowed key (a *fully masked row*) has output zero, the
behaviour of PyTorch's SDPA; ``ftattn_jax.dot_product_attention`` instead
spreads such a row uniformly over all keys, as ``jax.nn`` does, except rows
beyond the query length, which both zero.

Validation works on ``(shape, dtype name)`` pairs, like ``validation``.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from .arrays import ArrayOps

INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")

#: How a fully masked row is filled: ``"zero"`` (output 0) or ``"uniform"``
#: (the softmax of equal logits: the mean of every value row).
EMPTY_ROWS = ("zero", "uniform")


class Masking(NamedTuple):
    """Validated mask settings of one call (shapes are padded to rank 4)."""

    mask_shape: tuple | None
    bias_shape: tuple | None
    window: tuple[int, int] | None
    query_lengths: bool
    key_lengths: bool

    @property
    def structured(self) -> bool:
        """True when at most ``is_causal`` restricts the keys: the checks then use
        prefix sums instead of masked sums (``docs/tolerances.md``)."""
        return self.mask_shape is None and self.window is None and not (self.query_lengths or self.key_lengths)


def _broadcast_shape(name: str, shape, dims: dict) -> tuple[int, ...]:
    target = (dims["B"], dims["N"], dims["T"], dims["S"])
    shape = tuple(int(n) for n in shape)
    if len(shape) > 4:
        raise ValueError(f"{name}: expected rank <= 4, broadcastable to (B, N, T, S) = {target}, "
                         f"got rank {len(shape)} with shape {shape}")
    padded = (1,) * (4 - len(shape)) + shape
    for axis, n, want in zip("BNTS", padded, target):
        if n not in (1, want):
            raise ValueError(f"{name}: expected a shape broadcastable to (B, N, T, S) = {target} "
                             f"(axis {axis} of size 1 or {want}), got {shape}")
    return padded


def normalize_window(local_window_size) -> tuple[int, int] | None:
    """``None``, an int ``w`` (``(w, w)``) or a pair ``(left, right)`` of ints >= 0."""
    if local_window_size is None:
        return None
    value = local_window_size
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in value)):
        raise TypeError(f"local_window_size: expected None, an int or a pair (left, right) of ints, "
                        f"got {type(local_window_size).__name__} {local_window_size!r}")
    left, right = (int(w) for w in value)
    if left < 0 or right < 0:
        raise ValueError(f"local_window_size: expected sizes >= 0, got {local_window_size!r}")
    return left, right


#: "no bound" for a side of the band of keys a query attends (T and S stay far below it)
UNBOUNDED: int = 1 << 30


def band(window, is_causal: bool) -> tuple[int, int]:
    """``(left, right)``: query ``i`` attends keys ``i - left <= j <= i + right`` under a normalized
    ``window`` (or None) and ``is_causal`` combined; ``UNBOUNDED`` where a side has no bound. The
    fused kernels visit only the tiles of keys in this band."""
    left, right = window if window is not None else (UNBOUNDED, UNBOUNDED)
    if is_causal:
        right = min(right, 0)
    return min(left, UNBOUNDED), min(right, UNBOUNDED)


def validate_masking(dims: dict, *, mask=None, bias=None, query_lengths=None, key_lengths=None,
                     window=None, names=("mask", "bias", "query_seq_lengths", "key_value_seq_lengths",
                                         "local_window_size")) -> Masking:
    """Check the mask arguments of a call with legend sizes ``dims``.

    ``mask``, ``bias`` and the lengths are ``(shape, dtype name)`` pairs or
    None; ``names`` are the argument names to put in errors (the drop-ins use
    their frameworks' names).
    """
    n_mask, n_bias, n_ql, n_kl, n_win = names
    mask_shape = bias_shape = None
    if mask is not None:
        shape, dt = mask
        if dt != "bool":
            raise TypeError(f"{n_mask}: expected a bool array (True = attend; pass additive masks as "
                            f"{n_bias}), got dtype {dt}")
        mask_shape = _broadcast_shape(n_mask, shape, dims)
    if bias is not None:
        shape, dt = bias
        if dt not in FLOAT_DTYPES:
            raise TypeError(f"{n_bias}: expected a floating dtype, one of {FLOAT_DTYPES}, got {dt}")
        bias_shape = _broadcast_shape(n_bias, shape, dims)
    for name, lengths in ((n_ql, query_lengths), (n_kl, key_lengths)):
        if lengths is None:
            continue
        shape, dt = lengths
        if dt not in INTEGER_DTYPES:
            raise TypeError(f"{name}: expected an integer dtype (int32), got {dt}")
        if tuple(shape) != (dims["B"],):
            raise ValueError(f"{name}: expected shape (B,) = ({dims['B']},), got {tuple(shape)}")
    try:
        win = normalize_window(window)
    except (TypeError, ValueError) as e:
        raise type(e)(str(e).replace("local_window_size", n_win, 1)) from None
    return Masking(mask_shape, bias_shape, win, query_lengths is not None, key_lengths is not None)


# ---- the mask algebra, written once against a backend's ArrayOps


def combine(B: int, T: int, S: int, ops, *, mask=None, is_causal: bool = False, window=None,
            query_lengths=None, key_lengths=None):
    """Boolean ``(B|1, N|1, T, S)``, True where query ``i`` attends key ``j`` (the AND of
    every form given), in the framework of ``ops`` (an ``ftattn_spec.arrays.ArrayOps``).

    None when nothing but ``is_causal`` restricts the keys: the checks then use
    the causal prefix sums, and the softmax the ``(T, S)`` causal mask.
    """
    if mask is None and window is None and query_lengths is None and key_lengths is None:
        return None
    # every operand 4-D: JAX's rank promotion may be set to "raise" (its own tests do)
    i, j = ops.arange(T)[None, None, :, None], ops.arange(S)[None, None, None, :]
    a = ops.ones((1, 1, T, S))
    if mask is not None:
        a = a & mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    if is_causal:
        a = a & (j <= i)
    if window is not None:
        left, right = window
        a = a & (j >= i - left) & (j <= i + right)
    if query_lengths is not None:
        a = a & (ops.arange(T)[None, :] < query_lengths[:, None])[:, None, :, None]
    if key_lengths is not None:
        a = a & (ops.arange(S)[None, :] < key_lengths[:, None])[:, None, None, :]
    return a


def attended(allowed_mask, is_causal: bool, T: int, S: int, ops):
    """The mask the checksums and the softmax apply: ``allowed_mask``, or the ``(1, 1, T, S)``
    causal mask when only ``is_causal`` restricts the keys, or None."""
    if allowed_mask is None and is_causal:
        return ops.arange(S)[None, None, None, :] <= ops.arange(T)[None, None, :, None]
    return allowed_mask


def live(T: int, query_lengths, ops):
    """Rows within the query length (bool ``B 1 T 1``), or None without lengths."""
    if query_lengths is None:
        return None
    return (ops.arange(T)[None, :] < query_lengths[:, None])[:, None, :, None]


def _take_last(x, idx):
    return np.take_along_axis(x, idx[..., None], axis=-1)[..., 0]


#: NumPy's spelling of the spec's array operations (the float64 oracle uses it).
NUMPY_OPS = ArrayOps(arange=np.arange, ones=lambda shape: np.ones(shape, bool), where=np.where,
                     isfinite=np.isfinite, isnan=np.isnan, take_last=_take_last,
                     stack_last=lambda xs: np.stack(xs, axis=-1), int32=lambda x: np.asarray(x).astype(np.int32))


def allowed(B: int, N: int, T: int, S: int, *, mask=None, is_causal=False, window=None,
            query_lengths=None, key_lengths=None) -> np.ndarray:
    """NumPy ``(B, N, T, S)`` bool: True where query ``i`` attends key ``j``."""
    arr = lambda x, dt=None: None if x is None else np.asarray(x, dt)  # noqa: E731
    a = combine(B, T, S, NUMPY_OPS, mask=arr(mask, bool), is_causal=is_causal, window=normalize_window(window),
                query_lengths=arr(query_lengths), key_lengths=arr(key_lengths))
    a = attended(a, is_causal, T, S, NUMPY_OPS)
    return np.ones((B, N, T, S), bool) if a is None else np.broadcast_to(a, (B, N, T, S)).copy()


def live_rows(B: int, T: int, query_lengths=None) -> np.ndarray:
    """``(B, 1, T, 1)`` bool: rows within the query length (all True without lengths)."""
    rows = live(T, None if query_lengths is None else np.asarray(query_lengths), NUMPY_OPS)
    return np.ones((B, 1, T, 1), bool) if rows is None else rows
