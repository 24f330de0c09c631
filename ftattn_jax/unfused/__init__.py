"""``implementation="unfused"``: the schemes as separate jit-compiled XLA operations, every check,
localization and repair (:mod:`.core`; the checks' algebra in :mod:`.checks`)."""

from .core import run

__all__ = ["run"]
