"""The one place that knows how the Pallas GPU API differs between JAX versions.

Supported: jax 0.10.2 (Python 3.11, CPU CI) through 0.11.x (the GPU machine).
What moved, and what this module resolves:

* ``dot``: ``jax.experimental.pallas.dot`` is deprecated since 0.10.2 and
  lives in ``jax.experimental.pallas.triton``; older releases only had
  ``pl.dot``.
* compiler parameters of the Triton lowering: ``pallas.triton.CompilerParams``
  (``pallas.gpu.TritonCompilerParams`` in older releases).
* ``load``/``store`` with masks moved to ``pallas.triton`` too; the kernels
  here pad their inputs and index refs directly, so they need neither.
* 0.11 deprecates the Triton lowering and warns (``DeprecationWarning``,
  "The Pallas Triton backend is deprecated") each time one is lowered:
  :func:`quiet_lowering` silences exactly that warning around our own calls.
* Mosaic GPU (``jax.experimental.pallas.mosaic_gpu``): :func:`mosaic_gpu`
  imports it, or returns None where it is missing.
* A ``custom_partitioning`` callback's shardings: :func:`spec_of` reads an
  XLA sharding as a ``PartitionSpec`` of a mesh through JAX's own parser
  (``jax._src.sharding_impls``; None where it cannot, e.g. a sub-axis).
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import jax
from jax.experimental import pallas as pl

JAX_VERSION: tuple[int, ...] = tuple(int(x) for x in jax.__version__.split(".")[:3] if x.isdigit())

try:  # jax >= 0.7: the Triton namespace holds dot and the compiler parameters
    from jax.experimental.pallas import triton as _plt

    dot = _plt.dot
    TritonCompilerParams = _plt.CompilerParams
except (ImportError, AttributeError):  # pragma: no cover - older releases
    from jax.experimental.pallas import gpu as _plg

    dot = pl.dot
    TritonCompilerParams = _plg.TritonCompilerParams


def triton_params(num_warps: int, num_stages: int):
    """Compiler parameters of the Triton lowering."""
    return TritonCompilerParams(num_warps=num_warps, num_stages=num_stages)


_TRITON_DEPRECATION = "The Pallas Triton backend is deprecated"


@contextlib.contextmanager
def quiet_lowering():
    """Silence jax 0.11's deprecation warning of the Triton lowering (nothing else)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TRITON_DEPRECATION, category=DeprecationWarning)
        yield


def mosaic_gpu():
    """``jax.experimental.pallas.mosaic_gpu``, or None where it cannot be imported."""
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu
    except ImportError:  # pragma: no cover - depends on the installed jaxlib
        return None
    return plgpu


@functools.cache
def _load_needs_index() -> bool:
    import inspect

    return inspect.signature(mosaic_gpu().load).parameters["idx"].default is inspect.Parameter.empty


def mgpu_load(ref, layout):
    """``plgpu.load`` of a whole (already indexed) ref into ``layout``.

    jax 0.10.2 requires the index argument (``()`` for the whole ref); 0.11
    deprecates it in favour of ``ref.at[...]``.
    """
    if _load_needs_index():
        return mosaic_gpu().load(ref, (), layout=layout)
    return mosaic_gpu().load(ref, layout=layout)


def spec_of(sharding, mesh, ndim: int):
    """``sharding`` (a ``NamedSharding``, or a ``GSPMDSharding`` as ``custom_partitioning`` gives
    with ``decode_shardings=False``) as a ``PartitionSpec`` of ``mesh`` with ``ndim`` entries, or
    None when it is none (a sub-axis of a mesh axis, another device order, another jax)."""
    spec = getattr(sharding, "spec", None)
    if spec is None:
        try:
            from jax._src.sharding_impls import parse_flatten_op_sharding
            spec = parse_flatten_op_sharding(sharding._hlo_sharding, mesh)[0]
        except Exception:  # noqa: BLE001 - unparseable here: the caller keeps everything whole
            return None
    return tuple(spec) + (None,) * (ndim - len(tuple(spec)))
