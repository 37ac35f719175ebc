"""Builders for the training job: device and backend, the process group, the measured phase's
model wrapping (DDP and comm hooks), its optimizer and ASPG's transport, and the per-mode
communication metrics. The recipe is sparsecomm.rl.config.TrainConfig; the loop is
sparsecomm.rl.trainer.Trainer, which calls these.

Device and backend (issue 16):

    device=auto   cuda:LOCAL_RANK when torch.cuda.is_available(), else cpu
    device=cuda   cuda:LOCAL_RANK; refused when CUDA is absent or LOCAL_RANK >= the visible GPUs
    backend=auto  nccl for a CUDA device, gloo for cpu

A backend that cannot move the device's tensors is refused at start with the reason, never left
to hang or to train on the wrong device: gloo with a CUDA model (our transport would stage its
buffers on the host), nccl with a CPU model (NCCL moves device memory only), nccl without a
NCCL build. Every check runs before init_process_group, so a mismatched rank fails fast instead of
waiting in the rendezvous for the others.

Registries, not if/elif chains: TRANSPORTS (comm mode -> ASPG's transport), HOOKS (comm mode ->
DDP comm hook), WIRE_BYTES (comm mode -> bytes a DDP mode sent, when nothing counted them).
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..track.comm import ring_allreduce_bytes
from .config import DDP_COMMS, TrainConfig


# ------------------------------------------------------------------ device and backend
def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK; 0 in one process)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def select_device(spec: str, local_rank_: int | None = None) -> torch.device:
    """auto | cpu | cuda | cuda:N -> a torch.device; ValueError with the reason when it cannot be had."""
    lr = local_rank() if local_rank_ is None else local_rank_
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        spec = "cuda"
    if not spec.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device={spec} but torch.cuda.is_available() is False (torch {torch.__version__}, "
                         f"built with CUDA {torch.version.cuda}): use device=cpu or a CUDA build of torch on a GPU host")
    count = torch.cuda.device_count()
    index = int(spec.split(":", 1)[1]) if ":" in spec else lr
    if index >= count:
        why = f"cuda:{index}" if ":" in spec else f"LOCAL_RANK {lr} (device=cuda means cuda:LOCAL_RANK)"
        raise ValueError(f"{why} but only {count} GPU(s) are visible: run at most {count} process(es) per node "
                         f"(torchrun --nproc-per-node {count}) or check CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", index)


def select_backend(spec: str, device: torch.device) -> str:
    """auto | gloo | nccl for `device`; ValueError when the backend cannot move the device's tensors."""
    if spec == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    check_backend_device(spec, device)
    return spec


def check_backend_device(backend: str, device: torch.device) -> None:
    """Refuse a backend / device pair that would fail (or hang) at the first collective."""
    if device.type == "cuda" and "nccl" not in backend:
        raise ValueError(f"backend={backend} with a model on {device}: the exchange and DDP would move CUDA tensors "
                         f"through a host-only backend; use backend=nccl (or auto), or device=cpu")
    if device.type == "cpu" and "gloo" not in backend:
        raise ValueError(f"backend={backend} with a model on cpu: NCCL moves device memory only; use backend=gloo "
                         f"(or auto), or device=cuda on a GPU host")
    if "nccl" in backend and not (dist.is_available() and dist.is_nccl_available()):
        raise ValueError(f"backend=nccl but this torch ({torch.__version__}) was built without NCCL")


def init_distributed(backend: str, device: torch.device) -> tuple[int, int]:
    """Join the torchrun job when WORLD_SIZE > 1 (or check the group a caller made); (rank, world)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and DDP use the current device: one GPU per process
    if dist.is_available() and dist.is_initialized():
        check_backend_device(dist.get_backend(), device)  # a group made by the caller must fit the model too
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend, **({"device_id": device} if device.type == "cuda" else {}))
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def runtime_info(device: torch.device, backend: str, world: int) -> dict:
    """What the run ran on, for config.json and summary.json: device, backend, torch/CUDA/NCCL versions."""
    nccl = None
    if torch.cuda.is_available():
        try:
            v = importlib.import_module("torch.cuda.nccl").version()  # not always imported with torch.cuda
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except (ImportError, AttributeError, RuntimeError):  # a build without NCCL
            nccl = None
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "backend": backend if world > 1 else None, "world_size": world, "torch": torch.__version__,
            "cuda": torch.version.cuda, "nccl": nccl}


def check_transport_device(transport, device: torch.device) -> None:
    """A transport that stages its buffers on another device type than the model is refused at start."""
    tdev = getattr(transport, "device", None)
    if tdev is not None and torch.device(tdev).type != device.type:
        raise ValueError(f"the {type(transport).__name__} works on {tdev} but the model is on {device}: "
                         f"backend={getattr(transport, 'backend', '?')} does not fit device={device.type}")


# ------------------------------------------------------------------ model wrapping
def wrap_ddp(model, device: torch.device, world: int, **kw):
    """DDP over the process group (one GPU per process on CUDA); the bare model in one process."""
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if device.type == "cuda":
        kw = {"device_ids": [device.index], "output_device": device.index, **kw}
    return DDP(model, **kw)


def _sparse_hook(cfg: TrainConfig, rank: int, saved):
    from ..exchange import SparseHookState, sparse_topk_hook

    state = saved or SparseHookState(density=cfg.density, value_codec=cfg.value_codec, seed=cfg.seed + rank)
    return state, sparse_topk_hook


def _powersgd_hook(cfg: TrainConfig, rank: int, saved):
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

    state = saved or psgd.PowerSGDState(process_group=None, matrix_approximation_rank=cfg.powersgd_rank,
                                        start_powerSGD_iter=2)
    return state, psgd.powerSGD_hook


# comm mode -> (cfg, rank, saved hook state or None) -> (state, hook); ddp has none
HOOKS: dict[str, Callable] = {"hook": _sparse_hook, "powersgd": _powersgd_hook}
# DDP options per mode: powerSGD_hook on gloo breaks with several buckets, so it gets one
DDP_KWARGS: dict[str, dict] = {"powersgd": {"bucket_cap_mb": 10_000}}


def build_rl_model(cfg: TrainConfig, model, device: torch.device, rank: int, world: int, saved_hook_state=None,
                   mesh=None):
    """The model the measured phase runs (DDP-wrapped for DDP modes, fully_shard-ed over `mesh` for
    engine=fsdp2) and its comm-hook state."""
    if cfg.engine == "fsdp2" and world > 1:
        return wrap_fsdp2(cfg, model, mesh or fsdp2_mesh(cfg))
    if cfg.comm not in DDP_COMMS or world == 1 or cfg.engine == "deepspeed":  # DeepSpeed wraps it itself
        return model, None
    m = wrap_ddp(model, device, world, **DDP_KWARGS.get(cfg.comm, {}))
    if cfg.comm not in HOOKS:
        return m, None
    state, hook = HOOKS[cfg.comm](cfg, rank, saved_hook_state)
    m.register_comm_hook(state, hook)
    return m, state


def fsdp2_mesh(cfg: TrainConfig):
    """engine=fsdp2: the ("replicate", "shard") mesh of `mesh` (RxS; "" = WORLDx1), checked against the world
    size and the processes per host on every rank (collective)."""
    from ..integrations.fsdp import hsdp_mesh

    return hsdp_mesh(cfg.mesh or f"{dist.get_world_size()}x1")


def wrap_fsdp2(cfg: TrainConfig, model, mesh):
    """engine=fsdp2: fully_shard each transformer block and the root over the mesh's shard dimension, then
    the sparse cross-replica all-reduce (comm=hook), or over the whole 2-D mesh: native HSDP (comm=ddp)."""
    from torch.distributed.fsdp import fully_shard

    from ..integrations.fsdp import install_sparse_hsdp

    over = mesh["shard"] if cfg.comm in ("hook", "aspg") else mesh  # aspg: ShardedASPG exchanges across replicas
    for block in getattr(getattr(model, "transformer", None), "h", []):  # GPT-2's blocks; other models: root only
        fully_shard(block, mesh=over)
    fully_shard(model, mesh=over)
    if cfg.comm != "hook":
        return model, None
    return model, install_sparse_hsdp(model, mesh, density=cfg.density, value_codec=cfg.value_codec, seed=cfg.seed)


class LocalShards:
    """A model as the trackers see it under FSDP2 or DeepSpeed ZeRO-3: this rank's local shard of every
    parameter (an alias of the DTensor's local tensor, or ZeRO-3's `ds_tensor` partition, so the optimizer's
    in-place updates reach it) beside its module structure (for layer kinds). Sparsity is then per rank,
    over its own shard."""

    def __init__(self, model):
        self.model = model

    @staticmethod
    def local(p):
        if hasattr(p, "ds_tensor"):  # ZeRO-3: p.data is empty outside forward/backward
            return p.ds_tensor
        return p.to_local() if hasattr(p, "to_local") else p

    def named_modules(self):
        return self.model.named_modules()

    def named_parameters(self):
        return ((name, self.local(p)) for name, p in self.model.named_parameters())

    def trainable_names(self) -> set[str]:
        return {name for name, p in self.model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------ optimizer and transport
def _torch_dist_transport(cfg: TrainConfig, rank: int):
    from ..exchange import TorchDistTransport

    return TorchDistTransport()


def _coordinator_transport(cfg: TrainConfig, rank: int):
    from ..exchange import CoordinatorTransport

    # with checkpoints, an outbox beside them: a restarted trainer never sends a counted delta twice
    outbox = Path(cfg.run_dir) / f"outbox_rank{rank}.msgpack" if cfg.checkpoint_every else None
    return CoordinatorTransport(cfg.coordinator, f"trainer-{rank}", outbox=outbox)


# comm mode -> ASPG's transport (comm=aspg in one process needs none: nothing to exchange)
TRANSPORTS: dict[str, Callable] = {"aspg": _torch_dist_transport, "coordinator": _coordinator_transport}


def build_transport(cfg: TrainConfig, rank: int, world: int, device: torch.device):
    if cfg.comm not in TRANSPORTS or (cfg.comm == "aspg" and world == 1):
        return None
    transport = TRANSPORTS[cfg.comm](cfg, rank)
    check_transport_device(transport, device)
    return transport


def param_groups(cfg: TrainConfig, model) -> list:
    """The trainable parameters; with kind_density, one group per layer kind with its own density."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not cfg.kind_density:
        return params
    from ..track.layers import named_parameter_kinds

    kinds = named_parameter_kinds(model)
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(kinds.get(name, "other"), []).append(p)
    return [{"params": ps, "density": float(cfg.kind_density.get(kind, cfg.density))} for kind, ps in groups.items()]


def _aspg_kwargs(cfg, rank, world) -> dict:
    """ASPG's hyperparameters from a recipe (ASPG over whole parameters and ShardedASPG alike)."""
    return dict(lr=cfg.rl_lr, density=cfg.density, value_codec=cfg.value_codec,
                dense_baseline_every=cfg.dense_baseline_every if world > 1 else 0, seed=cfg.seed + rank,
                **({"budget": "per_tensor"} if cfg.kind_density else {}), **cfg.aspg)


def _aspg(cfg, params, rank, world, device):
    from ..optim import ASPG

    return ASPG(params, transport=build_transport(cfg, rank, world, device), **_aspg_kwargs(cfg, rank, world))


def _adafactor(cfg, params, rank, world, device):
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=cfg.rl_lr, scale_parameter=False, relative_step=False)


# optimizer name -> (cfg, params, rank, world, device) -> torch.optim.Optimizer; state follows the params' device
OPTIMIZER_BUILDERS: dict[str, Callable] = {
    "aspg": _aspg,
    "adamw": lambda cfg, params, rank, world, device: torch.optim.AdamW(params, lr=cfg.rl_lr),
    "sgd": lambda cfg, params, rank, world, device: torch.optim.SGD(params, lr=cfg.rl_lr, momentum=0.9),
    "adafactor": _adafactor,
}


def build_optimizer(cfg: TrainConfig, model, rank: int, world: int, device: torch.device, mesh=None):
    """The measured phase's optimizer over the trainable parameters (ASPG with its transport; under
    engine=fsdp2, ASPG on the local shards exchanging across mesh["replicate"])."""
    if cfg.optimizer == "aspg" and mesh is not None:
        from ..integrations.fsdp import ShardedASPG

        return ShardedASPG(model, mesh, **_aspg_kwargs(cfg, rank, world))
    return OPTIMIZER_BUILDERS[cfg.optimizer](cfg, param_groups(cfg, model), rank, world, device)


# ------------------------------------------------------------------ DeepSpeed (engine=deepspeed)
class DeepSpeedStep:
    """The trainer's optimizer interface over a DeepSpeed engine: backward and step go through it.

    `last_metrics` are ASPG's (comm=aspg) or the compressed reduction's (comm=hook); DeepSpeed's
    own dense path counts nothing (WIRE_BYTES' ring formula stands for it)."""

    def __init__(self, engine, comm_state):
        self.engine, self.comm_state = engine, comm_state

    def zero_grad(self) -> None:
        """engine.step() clears the gradients itself."""

    def backward(self, loss) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    @property
    def last_metrics(self) -> dict:
        return getattr(self.comm_state, "last_metrics", {})


def deepspeed_config(cfg: TrainConfig) -> dict:
    """The DeepSpeed config of a recipe: `deepspeed_config`'s JSON, then what the recipe decides."""
    from ..integrations.deepspeed import load_config

    ds = load_config(cfg.deepspeed_config) if cfg.deepspeed_config else {}
    ds.setdefault("train_micro_batch_size_per_gpu", 1)  # the trainer makes its own batches; DeepSpeed only asserts it
    ds.setdefault("gradient_clipping", 0.0)  # DeepSpeed 0.19.8 clips at 1.0 unless told; the ddp engine does not clip
    ds.setdefault("steps_per_print", 10 ** 9)
    ds["gradient_accumulation_steps"] = 1
    ds.setdefault("zero_optimization", {})["stage"] = cfg.zero_stage
    if cfg.optimizer == "adamw":
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.rl_lr, "torch_adam": True}}  # no FusedAdam build
    return ds


def build_deepspeed(cfg: TrainConfig, model, rank: int, world: int, device: torch.device):
    """(engine, DeepSpeedStep, the communication state) for the measured phase (engine=deepspeed)."""
    import deepspeed

    from ..integrations import deepspeed as sds
    from .config import DEEPSPEED_COMMS

    sds.check_version()
    # the SFT warm start leaves its last gradient in .grad, and engine.backward accumulates into it (the ddp
    # engine's optimizer clears it before the first RL backward; the DeepSpeed step's zero_grad cannot: it
    # leaves clearing to engine.step()), so without this the first RL step would add the SFT gradient
    model.zero_grad(set_to_none=True)
    os.environ.setdefault("LOCAL_RANK", str(local_rank()))
    deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else "gloo")
    comm = DEEPSPEED_COMMS[cfg.comm]
    optimizer = build_optimizer(cfg, model, rank, world, device) if cfg.optimizer == "aspg" else None
    state = sds.SparseReduceState(density=cfg.density, value_codec=cfg.value_codec, seed=cfg.seed + rank,
                                  param_density=cfg.param_density or None) if comm == "sparse_grad" else None
    engine = sds.initialize(model, deepspeed_config(cfg), optimizer=optimizer, comm=comm, state=state)
    comm_state = getattr(engine, "sparsecomm_state", None)
    return engine, DeepSpeedStep(engine, comm_state), comm_state if comm == "sparse_grad" else None


# ------------------------------------------------------------------ communication metrics
def powersgd_bytes(model, rank: int, world: int, step: int, start_iter: int = 2) -> int:
    """Per-worker ring all-reduce volume of PyTorch's PowerSGD hook (a formula, not a count): dense
    before `start_iter`; then each matrix m x n sends its rank-r factors P (m x r) and Q (n x r),
    unless that would not compress by 2x (the hook's min_compression_rate), and vectors go dense."""
    if step < start_iter:
        return ring_allreduce_bytes(sum(p.numel() for p in model.parameters() if p.requires_grad), 4, world)
    floats = 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.dim() >= 2:
            m, n = p.shape[0], p.numel() // p.shape[0]
            floats += (m + n) * rank if (m + n) * rank * 2 <= m * n else m * n
        else:
            floats += p.numel()
    return ring_allreduce_bytes(floats, 4, world)


# comm mode -> what a DDP mode sent this step when its hook does not count bytes itself
WIRE_BYTES: dict[str, Callable] = {
    "ddp": lambda cfg, model, world, step, numel: {"comm/sent_bytes": ring_allreduce_bytes(numel, 4, world),
                                                   "comm/path": "dense"},
    "powersgd": lambda cfg, model, world, step, numel: {
        "comm/sent_bytes": powersgd_bytes(model, cfg.powersgd_rank, world, step), "comm/path": "powersgd",
        "comm/bytes_are": "formula"},
}


def comm_metrics(cfg: TrainConfig, *, opt, hook_state, comm_tracker, model, world: int, step: int, numel: int,
                 backward_s: float) -> dict:
    """One step's communication keys, for every comm mode, in one place.

    ASPG counts its own encoded buffers and times its own dense baseline (opt.last_metrics). DDP
    modes communicate inside backward: a hook that counts (sparsecomm's) reports its last_metrics,
    the others get WIRE_BYTES' count or formula; the dense baseline is measured here beside them.
    Every mode reports the dense ring all-reduce volume of the same parameters for comparison.
    """
    out: dict = {}
    if cfg.optimizer == "aspg":
        out.update(opt.last_metrics)
    else:
        if hook_state is not None and hasattr(hook_state, "last_metrics"):
            out.update(hook_state.last_metrics)
        elif world > 1:
            out.update(WIRE_BYTES.get(cfg.comm, WIRE_BYTES["ddp"])(cfg, model, world, step, numel))
        comm_tracker.dense_baseline(step, [LocalShards.local(p) for p in model.parameters()])  # FSDP2: local shards
        out.update({k: v for k, v in comm_tracker.collect(numel, 4, world).items() if k.startswith("timing/dense")})
        out["timing/backward_with_comm_s"] = backward_s
    if (cfg.engine == "deepspeed" and cfg.comm == "hook" and cfg.zero_stage in (1, 2) and not cfg.param_density
            and world > 1):
        # ZeRO-1/2 still all-gathers the updated partitions densely ((P-1)/P of the weights per rank per step,
        # a formula: DeepSpeed counts nothing); without it here the step would look ~100x cheaper than it is
        gather = (world - 1) * numel * next(model.parameters()).element_size() // world
        out["comm/deepspeed_allgather_bytes"] = gather
        out["comm/sent_bytes"] = out.get("comm/sent_bytes", 0) + gather
    out["comm/dense_equiv_bytes"] = ring_allreduce_bytes(numel, 4, world)
    return out
