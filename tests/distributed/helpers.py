"""Run a function on P processes joined by a gloo process group over loopback."""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsecomm.dist_utils import shutdown_process_group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, out_dir, args):
    torch.set_num_threads(1)  # P processes share 2 cores
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    ok = False
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        ok = True
    finally:
        # barrier first: a rank that returns from its last collective early must not tear gloo down
        # under a peer still finishing it (SIGABRT at teardown); no barrier after a failure here
        shutdown_process_group(barrier=ok)


def run_workers(fn, world_size: int, out_dir: Path, *args) -> list:
    """Spawn `world_size` processes running fn(rank, world_size, *args); return their results."""
    mp.spawn(_entry, args=(fn, world_size, free_port(), str(out_dir), args), nprocs=world_size, join=True)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
