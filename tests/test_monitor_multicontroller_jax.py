"""``ftattn_jax.monitor.Monitor`` in a multi-controller job: two JAX processes on the CPU
(``jax.distributed``, gloo collectives), each counting its own calls, get one verdict per step that
names the process where a fault was injected, its site, check and row."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

WORKER = os.path.join(os.path.dirname(__file__), "multicontroller_jax_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_verdict_across_processes():
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    got = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert [g["process"] for g in got] == [0, 1] and all(g["count"] == 2 for g in got)
    assert got[0]["clean"] == got[1]["clean"] and got[0]["faulty"] == got[1]["faulty"]  # one verdict
    clean, faulty = got[0]["clean"], got[0]["faulty"]
    assert not clean["detected"] and clean["calls"] == 4
    assert faulty["detected"] and faulty["ranks"] == [1] and faulty["calls"] == 4
    assert faulty["sites"]["layer 0"][:3] == [2, 0, []]
    assert faulty["sites"]["layer 1"] == [2, 1, [1], {"1": ["softmax_dmr", [1, 2, 4]]}]
    assert "rank 1" in faulty["summary"] and "layer 1" in faulty["summary"]
