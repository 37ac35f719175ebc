"""Exchange layer: how every worker's sparse delta becomes one aggregate that every replica applies.

    transport.py   the collectives (LocalTransport; torch_dist.py: gloo/NCCL; zmq_client.py: ZeroMQ)
    paths.py       dense | allgather | split: bytes model and the switch (PathChooser)
    split.py       split sparse all-reduce: reduce-scatter to shard owners, owner top-k, all-gather
    pipeline.py    SparseExchange: select -> encode -> transport -> decode -> apply, once for all callers
    aggregate.py   deterministic rank-order decoding and means
    ddp_hook.py    the DDP comm hook (SparseExchange per bucket)
    coordinator    the ZeroMQ coordinator (aggregates in one process, serves rollout workers)
"""
from .aggregate import apply_mean_, decode_all, mean_of_deltas
from .paths import PATHS, SWITCH_POLICIES, PathChooser, choose_path, predicted_bytes
from .pipeline import DenseSink, FlatLayout, SparseExchange
from .split import SplitAllReduce
from .transport import LocalTransport, Transport

__all__ = ["PATHS", "SWITCH_POLICIES", "PathChooser", "choose_path", "predicted_bytes", "LocalTransport", "Transport",
           "apply_mean_", "decode_all", "mean_of_deltas", "DenseSink", "FlatLayout", "SparseExchange", "SplitAllReduce",
           "TorchDistTransport", "SparseHookState", "sparse_topk_hook", "Coordinator", "CoordinatorConfig",
           "CoordinatorClient", "CoordinatorTransport", "RolloutClient", "CoordinatorError"]


def __getattr__(name):  # torch.distributed transport, ZeroMQ and DDP pieces imported lazily
    if name == "TorchDistTransport":
        from .torch_dist import TorchDistTransport

        return TorchDistTransport
    if name in ("Coordinator", "CoordinatorConfig"):
        from . import coordinator

        return getattr(coordinator, name)
    if name in ("CoordinatorClient", "CoordinatorTransport", "RolloutClient", "CoordinatorError"):
        from . import zmq_client

        return getattr(zmq_client, name)
    if name in ("SparseHookState", "sparse_topk_hook"):
        from . import ddp_hook

        return getattr(ddp_hook, name)
    raise AttributeError(name)
