"""Run by tests/test_monitor_multicontroller_jax.py: one process of a 2-process JAX job on the CPU
(``jax.distributed`` with gloo collectives). Each process counts its own calls; the monitor gathers
every process's tallies. Prints one JSON object."""

from __future__ import annotations

import json
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port = int(sys.argv[1]), int(sys.argv[2])
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)

import numpy as np  # noqa: E402

import ftattn_jax  # noqa: E402
from ftattn_spec import Fault  # noqa: E402

B, T, N, S, H = 2, 7, 4, 9, 8


def main() -> None:
    rng = np.random.default_rng(pid)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((B, T, N, H), (B, S, N, H), (B, S, N, H)))
    mon = ftattn_jax.monitor.Monitor()
    layer = jax.jit(lambda q, k, v, f: ftattn_jax.attention(q, k, v, fault=f, site="layer 1")[0])
    got = {"process": jax.process_index(), "count": jax.process_count()}
    for step, fault in (("clean", None), ("faulty", Fault("probs", (1, 2, 4, 3), bit=29))):
        ftattn_jax.attention(q, k, v, site="layer 0")
        if fault is not None and pid == 1:
            layer(q, k, v, fault)
        else:
            ftattn_jax.attention(q, k, v, site="layer 1")
        m = mon.step()  # every process calls it: one gather per step
        got[step] = dict(detected=m.detected, ranks=list(m.ranks), calls=m.calls, summary=m.summary(),
                         sites={s: [x.calls, x.detected, list(x.ranks),
                                    {str(r): [w.check, list(w.index)] for r, w in x.first.items()}]
                                for s, x in m.sites.items()})
    print(json.dumps(got))


if __name__ == "__main__":
    main()
