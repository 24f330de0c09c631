"""``implementation="unfused"``: the schemes as separate jit-compiled XLA operations, every check,
localization and repair (:mod:`.core`; the checks' algebra in :mod:`.checks`)."""

from .core import Block, block, run

__all__ = ["Block", "block", "run"]
