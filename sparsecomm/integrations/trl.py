"""sparsecomm inside a Hugging Face / TRL Trainer (GRPOTrainer, SFTTrainer, any transformers.Trainer).

Install the extra: `pip install 'sparsecomm[trl]'`. Nothing here imports trl itself; it uses the
transformers Trainer API that TRL's trainers share.

    from sparsecomm.integrations.trl import SparsecommCallback, make_aspg

    opt = make_aspg(model, lr=1e-5, density=0.01)          # ASPG as the Trainer's optimizer
    trainer = GRPOTrainer(model=model, ..., optimizers=(opt, None))
    SparsecommCallback.attach(trainer, comm="aspg", run_dir="runs/grpo")
    trainer.train()

What the callback does:
  - every optimizer step: update sparsity (fp32 / bf16 view by layer kind, K-step), bytes and
    phase timings into one StepStats, written to RUN_DIR/stats_rank{R}.jsonl, optionally to a
    Prometheus endpoint, and merged into the Trainer's logs (so they reach W&B / TensorBoard);
  - under DDP (torchrun), in on_train_begin - the first callback after `Trainer.train()` wrapped
    the model in DistributedDataParallel (before it, `trainer.model_wrapped` is the bare model) -
    it registers a communication hook on `trainer.model_wrapped`:
        comm="hook"   sparsecomm's sparse top-k DDP hook (gradients, error feedback), any optimizer
        comm="aspg"   a hook that communicates nothing, so each rank keeps its own gradient and
                      the ASPG optimizer (make_aspg with a TorchDistTransport) exchanges the
                      sparse update instead: one exchange per step, not two
        comm="ddp"    DDP's own all-reduce (trackers only)

The Trainer recreates nothing once training started, so the hook stays registered. Under
DeepSpeed the Trainer swaps a custom optimizer for its own unless `Trainer.create_optimizer` is
overridden (transformers' DeepSpeed integration builds the optimizer from its config); use the
DDP path for ASPG.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..track import JsonlSink, PrometheusSink, Recorder, SparsityTracker, StepStats
from ..track.comm import ring_allreduce_bytes

COMMS = ("ddp", "hook", "aspg")


def make_aspg(model: torch.nn.Module, lr: float, density: float = 0.01, **options):
    """ASPG over the model's trainable parameters; with several processes, over the torch.distributed
    sparse exchange (pair it with SparsecommCallback(comm="aspg"), which turns DDP's all-reduce off)."""
    from ..optim import ASPG

    transport = None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from ..exchange import TorchDistTransport

        transport = TorchDistTransport()
    return ASPG([p for p in model.parameters() if p.requires_grad], lr=lr, density=density, transport=transport, **options)


def local_gradients_hook(state, bucket):
    """A DDP comm hook that communicates nothing: each rank keeps its own gradient (ASPG exchanges updates)."""
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


try:  # transformers is an extra; the callback needs its base class
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - exercised only without the extra
    TrainerCallback = object


class SparsecommCallback(TrainerCallback):
    def __init__(self, comm: str = "ddp", run_dir: str | Path = "runs/trl", density: float = 0.01,
                 value_codec: str = "bf16", tracker_mode: str = "fp32", tracker_every: int = 1, k_steps=(10,),
                 per_param: bool = False, metrics_port: int = -1, trainer=None):
        if comm not in COMMS:
            raise ValueError(f"comm must be one of {COMMS}, got {comm!r}")
        self.comm, self.run_dir, self.density, self.value_codec = comm, Path(run_dir), density, value_codec
        self.tracker_kw = dict(mode=tracker_mode, every=tracker_every, k_steps=k_steps, per_param=per_param)
        self.metrics_port, self.trainer = metrics_port, trainer
        self.hook_state = None
        self.tracker = None
        self.recorder = None
        self.last: dict = {}

    @classmethod
    def attach(cls, trainer, **kw) -> "SparsecommCallback":
        """Create the callback for `trainer` and add it (the DDP hook needs the trainer's wrapped model)."""
        cb = cls(trainer=trainer, **kw)
        trainer.add_callback(cb)
        return cb

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank, self.world = rank, world
        wrapped = getattr(self.trainer, "model_wrapped", None) if self.trainer is not None else None
        is_ddp = isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
        if world > 1 and self.comm != "ddp":
            if not is_ddp:
                raise RuntimeError(f"comm={self.comm!r} needs the Trainer's DDP model: use SparsecommCallback.attach(trainer, ...) "
                                   f"and run under torchrun without DeepSpeed/FSDP")
            if self.comm == "hook":
                from ..exchange import SparseHookState, sparse_topk_hook

                self.hook_state = SparseHookState(density=self.density, value_codec=self.value_codec, seed=args.seed + rank)
                wrapped.register_comm_hook(self.hook_state, sparse_topk_hook)
            else:
                wrapped.register_comm_hook(None, local_gradients_hook)
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the user's optimizer
        self.model = model
        self.numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.tracker = SparsityTracker(model, **self.tracker_kw)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        sinks = [JsonlSink(self.run_dir / f"stats_rank{rank}.jsonl")]
        if self.metrics_port >= 0:
            local = int(os.environ.get("LOCAL_RANK", rank))
            sinks.append(PrometheusSink(port=self.metrics_port + local if self.metrics_port else 0, rank=rank,
                                        run=self.run_dir.name, addr="0.0.0.0" if world > 1 else "127.0.0.1"))
        self.recorder = Recorder(sinks)

    def on_step_end(self, args, state, control, **kw):
        lr = None
        if self.optimizer is not None and getattr(self.optimizer, "param_groups", None):
            lr = self.optimizer.param_groups[0]["lr"]
        s = StepStats(step=state.global_step, rank=self.rank, world_size=self.world, run=self.run_dir.name)
        s.update(self.tracker.step(lr=lr))
        if getattr(self.optimizer, "last_metrics", None):  # ASPG: bytes, path, phases of its exchange
            s.update(self.optimizer.last_metrics)
        elif self.hook_state is not None:
            s.update(self.hook_state.last_metrics)
        elif self.world > 1:
            s.update({"comm/sent_bytes": ring_allreduce_bytes(self.numel, 4, self.world), "comm/path": "dense"})
        s.update({"comm/dense_equiv_bytes": ring_allreduce_bytes(self.numel, 4, self.world)})
        rewards = getattr(self.trainer, "_metrics", {}).get("train", {}).get("reward")  # TRL GRPO's running metrics
        if rewards:
            s.update({"train/reward": float(rewards[-1])})
        self.last = s.metrics
        self.recorder.record(s)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs is None or not self.last:
            return
        for k in ("sparsity/fp32_exact/global", "sparsity/bf16_view/global", "comm/sent_bytes", "comm/dense_equiv_bytes"):
            if isinstance(self.last.get(k), (int, float)):
                logs[f"sparsecomm/{k}"] = self.last[k]

    def on_train_end(self, args, state, control, **kw):
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None


__all__ = ["SparsecommCallback", "make_aspg", "local_gradients_hook"]
