"""``implementation="pallas"``: fused, self-checking flash-attention kernels in Pallas.

Kernel modules (:mod:`.pallas_kernel`, the portable kernel; :mod:`.mosaic_kernel`,
the Hopper kernel) share one interface: a block-size dataclass validated on
construction, ``unsupported(...)`` (why a call cannot run here, or None),
``config(...)`` and ``launch(...)`` returning a :class:`KernelOutput`.
:mod:`.runner` chooses one and makes the report; :mod:`.pallas_backward` is the
fused backward (with its checks), and :mod:`.gradients` judges it.
"""

from . import compat, kernel_ir, runner
from .mosaic_kernel import MosaicBlocks
from .pallas_backward import BackwardBlocks
from .pallas_kernel import BlockSizes
from .runner import (KERNELS, LOWERINGS, BackwardSettings, config, explain_lowering, hopper_ready, launch,
                     mosaic_can_inject, platform_of, resolve_interpret, run, select_lowering, validate_lowering)
from .side_inputs import KernelOutput, side_inputs

__all__ = ["BackwardBlocks", "BackwardSettings", "BlockSizes", "KERNELS", "KernelOutput", "LOWERINGS", "MosaicBlocks", "compat", "config", "explain_lowering", "hopper_ready", "kernel_ir",
           "launch", "mosaic_can_inject", "platform_of", "resolve_interpret", "run", "runner", "select_lowering",
           "side_inputs", "validate_lowering"]
