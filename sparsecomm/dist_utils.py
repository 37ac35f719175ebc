"""Process-group teardown that cannot race.

`dist.destroy_process_group()` on one rank while another rank still has a collective in flight
(its last all-gather still sending to us, an async work not yet waited on) tears the gloo
transport down under that work: the peer's gloo thread then throws from a destructor and the
process dies with SIGABRT ("terminate called without an active exception"). Seen in
tests/distributed/test_aspg_dist.py about once in eight runs. The fix is an ordering rule:
every rank passes a barrier - so every earlier collective has completed everywhere - before
any rank destroys the group.

    from sparsecomm.dist_utils import shutdown_process_group
    try:
        train()
    finally:
        shutdown_process_group()   # barrier, then destroy; a no-op without a process group
"""
from __future__ import annotations

import logging
from datetime import timedelta

log = logging.getLogger("sparsecomm.dist")


def shutdown_process_group(barrier: bool = True, timeout_s: float = 60.0) -> None:
    """Barrier, then destroy the default process group; a no-op without one.

    The barrier is bounded on gloo (`monitored_barrier`, `timeout_s`), so a caller on a failure
    path - where a peer may be gone - waits at most that long; pass `barrier=False` when this
    rank alone failed and its peers may be blocked in a collective it will never join. If the
    barrier fails, the group is destroyed anyway."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if barrier and dist.get_world_size() > 1:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=timeout_s))
            else:  # NCCL has no monitored barrier; its own timeout bounds the wait
                dist.barrier()
    except Exception as e:  # a dead or stuck peer: nothing left to wait for, still release our side
        log.warning("barrier before destroy_process_group failed: %s", e)
    finally:
        dist.destroy_process_group()
