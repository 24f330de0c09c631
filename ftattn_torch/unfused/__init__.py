"""``implementation="unfused"``: the schemes in eager PyTorch, every check, localization and
repair (:mod:`.core`; the checks' algebra in :mod:`.checks`)."""

from .core import run

__all__ = ["run"]
