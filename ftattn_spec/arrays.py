"""The few array operations the framework-free algebra needs, spelled by each backend.

``localization`` and the mask algebra of ``masking`` are written once, against
an :class:`ArrayOps`; a backend passes its spelling (``jnp`` or ``torch``,
bound to the call's device). Everything else they use (``&``, ``|``, ``~``,
comparisons, ``abs``, ``.sum(-1)``, ``.any(-1)``, ``.argmax(-1)``,
``.reshape``, ``.shape``, ``.ndim``) is spelled alike in both frameworks.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple


class ArrayOps(NamedTuple):
    """One framework's spelling of the operations that differ between them."""

    #: ``arange(n)``: integers ``0 … n-1`` on the call's device
    arange: Callable[[int], Any]
    #: ``ones(shape)``: a boolean array of True
    ones: Callable[[tuple], Any]
    #: ``where(cond, a, b)``, either branch may be a Python scalar
    where: Callable[[Any, Any, Any], Any]
    isfinite: Callable[[Any], Any]
    isnan: Callable[[Any], Any]
    #: ``take_last(x, idx)``: ``x[..., idx[...]]`` along the last axis (``idx`` has ``x``'s leading shape)
    take_last: Callable[[Any, Any], Any]
    #: ``stack_last(xs)``: stack along a new last axis
    stack_last: Callable[[list], Any]
    #: ``int32(x)``: ``x`` cast to int32
    int32: Callable[[Any], Any]
