"""Results of every ``compare`` command as one JSON schema, and their table and plot.

A results file is a JSON object: ``schema`` (:data:`SCHEMA`), ``command`` (``run``,
``train``, ...), ``config`` (the command's options), ``environment`` (date, command line,
Python, the GPU and its driver when there is one, and per framework its versions and
device under ``backends``) and ``rows`` (one dict per timed or skipped row; a missing
measurement is null). ``python -m compare.report <file or folder>`` re-renders the table
and the plot from the file alone; it also reads files written before the schema had a
name (their environment kept the host's facts under ``host``).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys

from . import plots, table


SCHEMA = "ftattn.compare/2"


def host_environment(command: str = "run") -> dict:
    """Date, command line, Python, and the GPU and its driver if ``nvidia-smi`` answers.
    ``command`` is the ``python -m compare`` command (``backward-faults`` runs the module
    ``compare.backward_faults``)."""
    module = f"compare.{command.replace('-', '_')}"
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "command": " ".join([sys.executable.split("/")[-1], "-m", module, *sys.argv[1:]]),
           "python": platform.python_version(), "machine": platform.machine()}
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
            if out:
                env["gpu"], env["driver"] = (x.strip() for x in out[0].split(",", 1))
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no NaN; a missing measurement is null
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def output_folder(path: str, flag: str = "--out") -> str:
    """Create ``path`` (a folder) and prove it writable, before any work is done.

    Raises ``SystemExit`` with one line naming ``flag`` when ``path`` is a file,
    cannot be created, or cannot be written (a read-only or virtual file system
    such as ``/proc``).
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise SystemExit(f"{flag}: expected a folder, got {path!r}, which is an existing file")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("")
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"{flag}: expected a folder that can be created and written, got {path!r} "
                         f"({e.strerror or type(e).__name__})") from None
    return path


def document(command: str, config: dict, backends: dict, rows: list[dict]) -> dict:
    """A results file's content: :data:`SCHEMA`, the command, its options, the environment
    (the host's facts, and ``backends``: each framework's), and the rows."""
    return {"schema": SCHEMA, "command": command, "config": config,
            "environment": {**host_environment(command), "backends": backends}, "rows": rows}


def gpu_of(environment: dict) -> str | None:
    """The GPU a results file was measured on, or None: ``environment.gpu`` (this schema),
    ``environment.host.gpu`` (older files), or a backend's CUDA device name."""
    for env in (environment, environment.get("host") or {}):
        if env.get("gpu"):
            return str(env["gpu"])
    for env in (environment.get("backends") or {}, environment):
        for v in env.values():
            dev = v.get("device") if isinstance(v, dict) else None
            if dev and not str(dev).lower().startswith("cpu"):
                return str(dev)
    return None


def save(path: str, doc: dict) -> None:
    with open(path, "w") as f:
        json.dump(_clean(doc), f, indent=1)


def load(path: str) -> dict:
    """Read a ``compare.run`` results file; ``ValueError`` (naming the file) if it
    is not JSON or not such a file."""
    with open(path) as f:
        try:
            doc = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: expected a compare.run results file (JSON), got text that is not "
                             f"JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a compare.run results file (a JSON object), got a JSON "
                         f"{type(doc).__name__}")
    for key in ("config", "environment", "rows"):
        if key not in doc:
            raise ValueError(f"{path}: expected a compare results file with {key!r}, got keys {sorted(doc)}")
    doc.setdefault("command", "run")
    restore_nans(doc["rows"])
    return doc


def restore_nans(rows: list[dict]) -> list[dict]:
    """Undo :func:`_clean`: a missing measurement (null) is NaN again."""
    for r in rows:
        for k, v in r.items():
            if v is None and k not in ("flags", "skipped"):
                r[k] = float("nan")
    return rows


def render(rows: list[dict], title: str = "", *, wide: bool = False, width: int | None = None) -> None:
    """The terminal table (:mod:`.table`)."""
    table.render(rows, title, wide=wide, width=width)


def plot(rows: list[dict], path: str, title: str = "") -> str | None:
    """The relative-time plot and its CSV (:mod:`.plots`)."""
    return plots.plot(rows, path, title)
