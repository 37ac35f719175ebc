"""Exchange layer: transports that turn every worker's sparse delta into one shared aggregate."""
from .base import SWITCH_POLICIES, LocalTransport, PathChooser, Transport, aggregate_mean, choose_path

__all__ = ["SWITCH_POLICIES", "PathChooser", "LocalTransport", "Transport", "aggregate_mean", "choose_path", "TorchDistTransport", "SparseHookState",
           "sparse_topk_hook"]


def __getattr__(name):  # torch.distributed transport imported lazily
    if name == "TorchDistTransport":
        from .torch_dist import TorchDistTransport

        return TorchDistTransport
    if name in ("SparseHookState", "sparse_topk_hook"):
        from . import ddp_hook

        return getattr(ddp_hook, name)
    raise AttributeError(name)
