"""The ``allowed`` mask of a call, from the forms of ``ftattn_spec.masking``."""

from __future__ import annotations

import torch
from jaxtyping import Bool
from torch import Tensor


def allowed(B: int, T: int, S: int, device, *, mask=None, is_causal: bool = False, window=None,
            query_lengths=None, key_lengths=None) -> Bool[Tensor, "B N T S"] | None:
    """Boolean ``(B|1, N|1, T, S)``, True where query ``i`` attends key ``j``.

    None when nothing but ``is_causal`` restricts the keys: the checks then use
    the causal prefix sums, and the softmax the ``(T, S)`` causal mask.
    """
    if mask is None and window is None and query_lengths is None and key_lengths is None:
        return None
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    a = torch.ones((1, 1, T, S), dtype=torch.bool, device=device)
    if mask is not None:
        a = a & mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    if is_causal:
        a = a & (j <= i)
    if window is not None:
        left, right = window
        a = a & (j >= i - left) & (j <= i + right)
    if query_lengths is not None:
        a = a & (torch.arange(T, device=device)[None, :] < query_lengths[:, None])[:, None, :, None]
    if key_lengths is not None:
        a = a & (torch.arange(S, device=device)[None, :] < key_lengths[:, None])[:, None, None, :]
    return a


def attended(allowed: Tensor | None, is_causal: bool, T: int, S: int, device) -> Tensor | None:
    """The mask the checksums and the softmax apply: ``allowed``, or the ``(T, S)``
    causal mask when only ``is_causal`` restricts the keys, or None."""
    if allowed is None and is_causal:
        return torch.arange(S, device=device)[None, :] <= torch.arange(T, device=device)[:, None]
    return allowed


def live_rows(B: int, T: int, device, query_lengths=None) -> Bool[Tensor, "B 1 T 1"] | None:
    """Rows within the query length, or None without lengths."""
    if query_lengths is None:
        return None
    return (torch.arange(T, device=device)[None, :] < query_lengths[:, None])[:, None, :, None]
