"""Exchange layer: transports that turn every worker's sparse delta into one shared aggregate."""
from .base import SWITCH_POLICIES, LocalTransport, PathChooser, Transport, aggregate_mean, apply_mean_, choose_path

__all__ = ["SWITCH_POLICIES", "PathChooser", "LocalTransport", "Transport", "aggregate_mean", "apply_mean_", "choose_path", "TorchDistTransport", "SparseHookState",
           "sparse_topk_hook", "Coordinator", "CoordinatorConfig", "CoordinatorClient", "CoordinatorTransport",
           "RolloutClient", "CoordinatorError"]


def __getattr__(name):  # torch.distributed transport imported lazily
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
