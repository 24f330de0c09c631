"""ftattn_spec: what both ftattn backends agree on, with no framework imports.

* ``axes``: the dimension legend (B T S N K H) and each backend's layout.
* ``schemes``: scheme catalogue, check names, granularities, notebook cells.
* ``shapes``: shape presets from the seed notebook.
* ``tolerances``: the rounding-error model behind every threshold.
* ``report``: the ``Report`` and ``CheckResult`` containers.
* ``faults``: the ``Fault`` specification, ``FaultDetected``, bit-flip model.
* ``validation``: argument checks shared by both backends.
* ``implementations``: the catalogue of implementations, and what each can run.
* ``arrays``, ``localization``: the array operations the shared algebra needs,
  and the localization of a single bad element.
* ``reference``: a float64 NumPy oracle.
"""

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

from .axes import LAYOUTS, LEGEND, REPORT_AXES, transpose_perm
from .faults import ON_FAULT, SITES, Fault, FaultDetected
from .implementations import FallbackWarning
from .report import CHECK_FIELDS, REPORT_FIELDS, CheckResult, Ran, Report
from .schemes import (CHECK_DESCRIPTIONS, CHECK_ORIENTATION, CHECKS, GRANULARITIES, SCHEME_NAMES,
                      SCHEMES, Scheme)
from .shapes import PRESET_NAMES, PRESETS, Shape, preset
from .validation import SUPPORTED_DTYPES

__all__ = [
    "CHECKS", "CHECK_DESCRIPTIONS", "FallbackWarning", "Fault", "FaultDetected", "ON_FAULT", "SITES", "CHECK_FIELDS",
    "CHECK_ORIENTATION", "CheckResult",
    "GRANULARITIES", "LAYOUTS", "LEGEND", "PRESETS", "PRESET_NAMES", "REPORT_AXES",
    "REPORT_FIELDS", "Ran", "Report", "SCHEMES", "SCHEME_NAMES", "SUPPORTED_DTYPES", "Scheme",
    "Shape", "__version__", "preset", "transpose_perm",
]
