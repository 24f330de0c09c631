"""The one input factory of the tests: ``q, k, v`` drawn from a named distribution of
:mod:`ftattn_spec.inputs`, rounded to a dtype and laid out as a framework takes them.

``framework="numpy"``: the logical layout ``BNTH`` (query) / ``BKSH`` (key, value);
``"jax"``: ``BTNH`` / ``BSKH``; ``"torch"``: ``BNTH`` / ``BKSH`` on ``device``. Values go
through float32 before the dtype, as in the backend adapters of :mod:`compare.backends`,
so that both frameworks round them identically. :func:`exact` gives back the float64
values the arrays hold, in the logical layout, for the float64 reference.
"""

from __future__ import annotations

import numpy as np

from ftattn_spec.inputs import draw_qkv

from .conftest import SHAPE

AXES = "BNKTSH"


def make_qkv(seed: int = 0, dist: str = "normal", *, framework: str = "numpy", dtype: str = "float32",
             device: str = "cpu", shape: dict | None = None, **sizes):
    """``(q, k, v)`` of ``shape`` (``tests.conftest.SHAPE`` unless given) with the axes in
    ``sizes`` (``B=..., T=...``) overridden."""
    dims = {**(SHAPE if shape is None else shape), **sizes}
    assert set(dims) == set(AXES), dims
    logical = draw_qkv(seed, dist, *(dims[a] for a in AXES))
    x32 = [x.astype(np.float32) for x in logical]
    if framework == "numpy":
        import ml_dtypes  # noqa: F401  (registers "bfloat16" with NumPy)

        return tuple(x.astype(dtype) for x in x32)
    if framework == "jax":
        import jax.numpy as jnp

        return tuple(jnp.asarray(np.ascontiguousarray(x.transpose(0, 2, 1, 3))).astype(dtype) for x in x32)
    if framework == "torch":
        import torch

        return tuple(torch.from_numpy(x).to(device).to(getattr(torch, dtype)) for x in x32)
    raise ValueError(f"framework: expected numpy, jax or torch, got {framework!r}")


def exact(x) -> np.ndarray:
    """The float64 values of one of :func:`make_qkv`'s arrays (or an output of the same layout),
    in the logical layout."""
    if isinstance(x, np.ndarray):
        return x.astype(np.float64)
    if type(x).__module__.startswith("torch"):
        return x.detach().double().cpu().numpy()
    import jax.numpy as jnp

    return np.asarray(x.astype(jnp.float32), np.float64).transpose(0, 2, 1, 3)


def scheme_params(slow=("abft_softmax",)):
    """Every scheme as a pytest parameter, those in ``slow`` under ``-m slow`` (by default
    ``abft_softmax``, a subset of ``abft_all``'s checks), to keep the default run short."""
    import pytest

    from ftattn_spec.schemes import SCHEME_NAMES

    return [pytest.param(s, marks=pytest.mark.slow) if s in slow else s for s in SCHEME_NAMES]

