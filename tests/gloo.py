"""What the tests that start gloo process groups on the CPU share: a free port, ranks spawned with
it, each writing what it saw as ``rank<r>.json``, and those files read back in rank order."""

from __future__ import annotations

import json
import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, world: int, tmp_path, *args) -> list[dict]:
    """``worker(rank, port, out, *args)`` on ``world`` processes; their JSON files, rank 0 first."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(free_port(), str(tmp_path), *args), nprocs=world, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def write(out: str, rank: int, got: dict) -> None:
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(got, f)
