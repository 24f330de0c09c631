"""``implementation="triton"``: a fused, self-checking flash-attention kernel in Triton.

:mod:`.blocks` holds the forward's tile settings (validated on construction) and how its tiles
are read; :mod:`.launch` is the kernel module (``unsupported``, the launches); :mod:`.runner` makes the report and the gradient.
"""

from .launch import STAT_PLANES, BlockSizes, Launch, Masks, auto_reason, dtype_name, forward, interpreting, unsupported
from . import launch, runner
from .runner import Backward, checked_backward, run

__all__ = ["auto_reason", "Backward", "BlockSizes", "checked_backward", "Launch", "Masks", "STAT_PLANES", "dtype_name", "forward", "interpreting", "launch", "run", "runner",
           "unsupported"]
