"""The fault models fleets report, as lists of :class:`~ftattn_spec.faults.Fault`.

Published fleet data do not describe single random bit flips alone: a 2026
study of GPU corruptions found single-bit flips in under 40% of them, and a
defective device repeats its error. Each model here is a function returning the
faults to pass as ``attention(..., fault=...)``; every implementation that
injects at the site takes them (the Hopper kernel takes single elements only,
and ``"auto"`` leaves plans to the portable kernel):

* :func:`single` (one bit of one element, the campaigns' default);
* :func:`multi_bit`: 2 to 4 bits of one element flipped together (one fault per
  bit, applied in turn: the XOR of the bits);
* :func:`stuck_row`, :func:`stuck_head`, :func:`stuck_call`: a bit held at 1
  (or 0) over a row of a head, a whole head, or every element of the site in
  the call (``Fault(stuck=...)`` with ``None`` wildcards): a defective unit;
* faults that repeat across calls are the same list passed to every call; the
  monitor's replay (``Monitor.replay``) then calls them persistent.

``MODELS`` names them for ``python -m compare.faults --model``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .faults import STUCK_SITES, Fault, bit_width


def single(site: str, index, bit: int, replica: int = 0) -> list[Fault]:
    """One bit of one element flipped."""
    return [Fault(site, tuple(index), bit=bit, replica=replica)]


def multi_bit(site: str, index, bits, replica: int = 0) -> list[Fault]:
    """The bits ``bits`` (2 to 4 distinct positions) of one element flipped together."""
    bits = tuple(bits)
    if not 2 <= len(bits) <= 4 or len(set(bits)) != len(bits):
        raise ValueError(f"bits: expected 2 to 4 distinct bit positions, got {bits!r}")
    return [Fault(site, tuple(index), bit=b, replica=replica) for b in bits]


def _stuck_site(site: str) -> None:
    if site not in STUCK_SITES:
        raise ValueError(f"site: expected one of {STUCK_SITES} for a stuck-at fault, got {site!r}")


def stuck_row(site: str, b: int, n: int, t: int, bit: int, to: int = 1) -> list[Fault]:
    """Bit ``bit`` held at ``to`` in every element of row ``t`` of head ``n`` of batch ``b``."""
    _stuck_site(site)
    return [Fault(site, (b, n, t, None), bit=bit, stuck=to)]


def stuck_head(site: str, b: int, n: int, bit: int, to: int = 1) -> list[Fault]:
    """Bit ``bit`` held at ``to`` in every element of head ``n`` of batch ``b``."""
    _stuck_site(site)
    return [Fault(site, (b, n, None, None), bit=bit, stuck=to)]


def stuck_call(site: str, bit: int, to: int = 1) -> list[Fault]:
    """Bit ``bit`` held at ``to`` in every element of ``site`` in the call."""
    _stuck_site(site)
    return [Fault(site, (None, None, None, None), bit=bit, stuck=to)]


def _draw_multi(rng, site, index, bit, dtype, replica):
    width = bit_width(site, dtype)
    extra = rng.choice([b for b in range(width) if b != bit], size=int(rng.integers(1, 4)), replace=False)
    return multi_bit(site, index, (bit, *(int(b) for b in extra)), replica)


#: ``--model`` name → ``draw(rng, site, index, bit, dtype, replica)``: the faults of one trial at
#: ``bit`` (the trial's bit position) and ``index`` (a random element of the site)
MODELS: dict[str, Callable] = {
    "single": lambda rng, site, index, bit, dtype, replica: single(site, index, bit, replica),
    "multi_bit": _draw_multi,
    "stuck_row": lambda rng, site, index, bit, dtype, replica: stuck_row(site, *index[:3], bit,
                                                                         int(rng.integers(2))),
    "stuck_call": lambda rng, site, index, bit, dtype, replica: stuck_call(site, bit, int(rng.integers(2))),
}

#: the sites each model can corrupt
MODEL_SITES: dict[str, tuple[str, ...] | None] = {"single": None, "multi_bit": None, "stuck_row": STUCK_SITES,
                                                  "stuck_call": STUCK_SITES}


def draw(model: str, rng: np.random.Generator, site: str, index, bit: int, dtype: str,
         replica: int = 0) -> list[Fault]:
    """The faults of one trial of ``model`` (``MODELS``)."""
    if model not in MODELS:
        raise ValueError(f"model: expected one of {tuple(MODELS)}, got {model!r}")
    return MODELS[model](rng, site, tuple(index), bit, dtype, replica)
