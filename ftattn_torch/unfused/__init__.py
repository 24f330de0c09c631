"""``implementation="unfused"``: the schemes in eager PyTorch, every check, localization and
repair (:mod:`.core`; the checks' algebra in :mod:`.checks`)."""

from .core import Block, block, run, uses_tf32

__all__ = ["Block", "block", "run", "uses_tf32"]
