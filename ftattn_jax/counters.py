"""Fault counters of the JAX backend: every protected call adds to them.

Per call site (a Flax module's path, a name given by the caller, or the file and
line of the call) a tally of ``ftattn_spec.tally.WIDTH`` integers: calls,
detections, non-finite inputs, and where the first detection flagged (check,
batch, head, row). How a call adds to it, cheapest first:

* **called eagerly** (the report is a concrete array): the call's row is kept
  on the device and added there; nothing waits;
* **traced** (inside ``jax.jit``, ``grad``, ``scan``, ``cond``, ``checkpoint``,
  ``checkify``) in a process with one device and no mesh in force, or under a
  mesh that ``jax.set_mesh`` put in force (one process, any number of devices):
  the row is added on the device to a ``jax.Ref`` the traced function closes
  over, replicated over the mesh's devices (the row is the same on each: the
  report's verdict is global); nothing waits. A call that ``checkpoint``
  recomputes in the backward counts again;
* **otherwise** (several devices with no ``jax.set_mesh``, where the traced
  function's devices are not known while it is traced; ``shard_map``; ``vmap``;
  partial evaluation such as Flax's ``nn.scan`` tracing its body; several
  processes; or the policy ``"warn"``, which must warn when it happens):
  ``jax.debug.callback``. The
  thread that dispatches the call then waits at the callback for the device:
  one device synchronisation per call, measured at 0.5 ms per call on an H200
  (docs/faults.md, "Counters").

:func:`read` and :func:`tally` wait for what was issued so far and read every
tally once (one device synchronisation); read them once per step
(``ftattn_jax.monitor`` does).
"""

from __future__ import annotations

import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from ftattn_spec import tally as spec_tally
from ftattn_spec.policy import FaultWarning
from ftattn_spec.report import Report

from .common import OPS, concrete_mesh, explicit_axes, in_auto_mode, manual_mesh, trace_kinds

#: sites per ``jax.Ref`` block: a traced function closes over the block of its sites
BLOCK = 64
#: eager rows kept per site before they are added on the device
FOLD = 256

_lock = threading.Lock()
_host: dict[str, list[int]] = {}  # tallies added on the host (callbacks)
_eager: dict[tuple[str, frozenset], list] = {}  # rows of eager calls per (site, devices), not yet added
_folded: dict[tuple[str, frozenset], jax.Array] = {}  # eager rows added on the device
_blocks: dict[tuple, list] = {}  # placement -> jax.Ref blocks of BLOCK × WIDTH int32 on it
_slots: dict[tuple[tuple, str], tuple[int, int]] = {}  # (placement, site) -> (block, row): fixed for the process
_ZERO = np.asarray(spec_tally.zero(), np.int32)


def _encode(verdict) -> jax.Array:
    if isinstance(verdict, Report):
        return spec_tally.encode(verdict, OPS)
    return spec_tally.encode_flag(jnp.asarray(verdict), OPS)


def _row(verdict) -> jax.Array:
    """The call's tally row (replicated; in JAX's explicit sharding mode, made in auto mode)."""
    like = getattr(verdict, "detected", verdict)
    flagged = [c.flagged for c in verdict.checks.values()] if isinstance(verdict, Report) else []
    like = next((x for x in flagged if explicit_axes(x)), like)
    if explicit_axes(like):
        return in_auto_mode(_encode, like, lambda shapes: jax.sharding.PartitionSpec())(verdict)
    return _encode(verdict)


_row_jit = jax.jit(_row)
_merge_rows = jax.jit(lambda rows: jax.lax.fori_loop(
    1, rows.shape[0], lambda i, acc: spec_tally.merge(acc, rows[i], OPS), rows[0]))


def _add_host(site: str, warn: bool, row) -> None:
    r = np.asarray(row).reshape(-1, spec_tally.WIDTH)
    with _lock:
        t = _host.get(site, spec_tally.zero())
        for x in r:
            t = spec_tally.merge_host(t, x)
        _host[site] = t
    if warn and int(r[:, 1].sum()):
        warnings.warn(f"ftattn (jax): a fault was detected in attention at {site} (nobody reads this call's "
                      f"report; policy 'warn')", FaultWarning, stacklevel=2)


#: the traces a closed-over Ref is known to work under (jax 0.10.2 to 0.11.2): staging (``jit``,
#: ``scan``, ``cond``, ``checkpoint``, ``checkify``), ``grad``/``linearize``, and eager evaluation.
#: Partial evaluation (``JaxprTrace``: Flax's ``nn.scan`` traces its body so), ``vmap`` and the
#: sharded traces are not: they get the callback.
_REF_TRACES = frozenset({"DynamicJaxprTrace", "LinearizeTrace", "JVPTrace", "EvalTrace"})


_use_refs = {"on": True}


def use_device_tallies(on: bool) -> bool:
    """Whether traced calls may add to a closed-over ``jax.Ref`` (the default, where
    :func:`_placement` allows it) or always use the host callback; returns the previous
    setting. Turn it off for a jitted function whose arguments live on another platform than
    the default device's (a CPU copy on a GPU machine): a Ref lives on the default device, and
    such a call would be refused for mixing devices."""
    if not isinstance(on, bool):
        raise TypeError(f"on: expected a bool, got {type(on).__name__} {on!r}")
    with _lock:
        previous, _use_refs["on"] = _use_refs["on"], on
    return previous


#: the placement of a Ref on the default device, in a process with one device and no mesh
_ONE = ("default device",)


def _placement():
    """Where a traced call may add to a closed-over ``jax.Ref``: ``(key, mesh or None)``, or None for
    the callback. A Ref lives on given devices, and a jitted function must run where its arguments
    are: so one device in the process and no mesh in force (the default device), or a mesh that
    ``jax.set_mesh`` put in force (a Ref replicated over its devices). Never inside ``shard_map``,
    ``pmap`` or a process of several, and only under traces of ``_REF_TRACES``."""
    if not _use_refs["on"] or jax.config.jax_default_device is not None or manual_mesh():
        return None
    kinds = trace_kinds()
    if kinds is None or not set(kinds) <= _REF_TRACES:
        return None
    mesh = getattr(jax.sharding, "get_abstract_mesh", None)
    abstract = mesh() if mesh is not None else None
    if abstract is None or bool(getattr(abstract, "empty", True)):
        return (_ONE, None) if jax.device_count() == 1 else None
    concrete = concrete_mesh()
    if concrete is None or jax.process_count() != 1:
        return None
    ids = tuple(int(d.id) for d in concrete.devices.flat)
    types = tuple(str(t) for t in getattr(concrete, "axis_types", ()))  # a Ref of an explicit mesh is refused in auto
    return (tuple(concrete.axis_names), tuple(concrete.devices.shape), types, ids), concrete


def _new_block(mesh):
    """A Ref of BLOCK tallies (on the default device, or replicated over ``mesh``), made on a thread
    of its own: JAX's trace state is per thread, so the Ref is concrete even when the caller is
    being traced (under ``grad`` a Ref made in the caller's thread would be a tracer, even inside
    ``ensure_compile_time_eval``)."""
    where = jax.devices()[0] if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    made = []
    worker = threading.Thread(target=lambda: made.append(
        jax.new_ref(jax.device_put(np.tile(_ZERO, (BLOCK, 1)), where))))
    worker.start()
    worker.join()
    if not made:  # pragma: no cover - the thread failed; its exception was printed
        raise RuntimeError("ftattn: could not allocate the device-side fault counters")
    return made[0]


def _slot(site: str, key: tuple, mesh) -> tuple[int, int]:
    with _lock:
        s = _slots.get((key, site))
        if s is None:
            blocks = _blocks.setdefault(key, [])
            n = sum(1 for k, _ in _slots if k == key)
            if n // BLOCK == len(blocks):
                blocks.append(_new_block(mesh))
            s = _slots[key, site] = (n // BLOCK, n % BLOCK)
    return s


def record(site: str, verdict, warn: bool = False) -> None:
    """Count one call of ``site``: ``verdict`` is its ``Report`` (counted with where it flagged)
    or a bool scalar (the fused backward's verdict); traced or not."""
    if warn:
        jax.debug.callback(lambda r: _add_host(site, True, r), _row(verdict))
        return
    if not isinstance(getattr(verdict, "detected", verdict), jax.core.Tracer):
        row = _row_jit(verdict)
        key = (site, frozenset(row.sharding.device_set))
        with _lock:
            rows = _eager.setdefault(key, [])
            rows.append(row)
            if len(rows) >= FOLD:
                _fold(key)
        return
    row = _row(verdict)
    placed = _placement()
    if placed is not None:
        try:  # refused under vmap (a batched verdict): counted by the callback below
            block, i = _slot(site, *placed)
            ref = _blocks[placed[0]][block]
            ref[i] = spec_tally.merge(ref[i], row, OPS)
            return
        except Exception:  # noqa: BLE001 - JAX's refusal has no stable type across versions
            pass
    jax.debug.callback(lambda r: _add_host(site, False, r), row)


def _fold(key: tuple[str, frozenset]) -> None:
    """Add the eager rows of ``key`` (site, devices) on their devices (``_lock`` held)."""
    rows = _eager.pop(key, [])
    if rows:
        base = _folded.get(key)
        _folded[key] = _merge_rows(jnp.stack(rows if base is None else [base, *rows]))


def tally() -> dict[str, spec_tally.SiteTally]:
    """Every site's :class:`ftattn_spec.tally.SiteTally`, after what was issued so far has run
    (one device synchronisation)."""
    jax.effects_barrier()
    with _lock:
        for key in list(_eager):
            _fold(key)
        rows: dict[str, list[int]] = {s: list(t) for s, t in _host.items()}
        for (site, _), t in _folded.items():
            rows[site] = spec_tally.merge_host(rows.get(site, spec_tally.zero()), np.asarray(t))
        blocks = {key: [np.asarray(b[...]) for b in refs] for key, refs in _blocks.items()}
        for (key, site), (b, i) in _slots.items():
            rows[site] = spec_tally.merge_host(rows.get(site, spec_tally.zero()), blocks[key][b][i])
    return {s: spec_tally.decode(r) for s, r in rows.items() if r[0] > 0}


def read() -> dict[str, dict[str, int]]:
    """``{site: {"detected": n, "calls": n}}``, after the calls issued so far have run."""
    return {s: {"detected": t.detected, "calls": t.calls} for s, t in tally().items()}


def detected() -> int:
    """Detections over every site."""
    return sum(s["detected"] for s in read().values())


def reset() -> None:
    """Zero every counter (after the calls issued so far)."""
    jax.effects_barrier()
    with _lock:
        _host.clear()
        _eager.clear()
        _folded.clear()
        for refs in _blocks.values():
            for b in refs:
                b[...] = jax.device_put(np.tile(_ZERO, (BLOCK, 1)), b[...].sharding)
