"""The training job: SFT warm start, then a measured phase (GRPO by default), under any
communication mode, fully tracked.

    cfg = TrainConfig.from_args(["--config", "launch/recipes/demo.yaml", "rl_steps=50"])
    trainer = Trainer(cfg); trainer.train(); trainer.close()

Communication modes for the RL phase (`comm`):

    local        one process, no communication (ASPG still sparsifies its own update)
    aspg         ASPG + the torch.distributed sparse exchange (automatic dense switch)
    coordinator  ASPG through the ZeroMQ coordinator at `coordinator` (tcp://host:port)
    ddp          DDP's dense all-reduce with `optimizer` (adamw | sgd | adafactor)
    hook         DDP + sparsecomm's sparse top-k comm hook at `density`, with `optimizer`
    powersgd     DDP + PyTorch's PowerSGD hook (rank `powersgd_rank`, one bucket), with `optimizer`

The SFT warm start is always dense (AdamW; DDP when distributed): it only brings the policy to
where RL has a signal, and is not what the run measures. The measured phase (`phase`) is GRPO
(`rl`), or, for the research matrix's task comparison, continued SFT (`sft`) or language-model
pretraining on the task's corpus (`pretrain`), from the same warm start with the same optimizer,
`rl_steps` and `rl_lr`. `precision=bf16` casts the model to bf16 after the warm start (pure-bf16
training: weights and optimizer state in bf16); `fp32` keeps fp32 master weights.

Every step of the measured phase records one StepStats per rank (reward, sparsity by definition,
bytes, phases, a measured dense all-reduce every `dense_baseline_every` steps) to
RUN_DIR/stats_rank{R}.jsonl, Prometheus (when `metrics_port` >= 0) and the console. With
`checkpoint_every` > 0 the trainer saves RUN_DIR/checkpoint_rank{R}.pt (model, optimizer, RNG
states, data cursor) and `resume=true` continues from it bit-exactly: the resumed run's weights
equal an uninterrupted run's.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..track import CommTracker, ConsoleSink, JsonlSink, PrometheusSink, Recorder, SparsityTracker, StepStats
from ..track.comm import ring_allreduce_bytes
from ..track.rank import RankTracker, stacked_rank
from .losses import GRPOConfig, evaluate, grpo_loss, pretrain_loss, sft_loss
from .models import build_model, char_tokenizer
from .tasks import datasets, make_reward, make_task

COMMS = ("local", "aspg", "coordinator", "ddp", "hook", "powersgd")
OPTIMIZERS = ("aspg", "adamw", "sgd", "adafactor")
PHASES = ("rl", "sft", "pretrain")
# config keys a resumed run may change: they do not alter what is computed
RESUME_MAY_CHANGE = ("resume", "rl_steps", "checkpoint_every", "console_every", "metrics_port")
PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    run_dir: str = "runs/demo"
    """Where the resolved config, StepStats JSONL, checkpoints and summary go."""
    model: str = "tiny"
    """Built-in tiny | small | medium (random init, char tokenizer), or a local path / cached HF name."""
    task: str = "addition"
    task_kwargs: dict = field(default_factory=lambda: {"digits": 2})
    reward: str = "default"
    """default | truthful | helpful | harmless (see sparsecomm.rl.tasks)."""
    seed: int = 0
    sft_steps: int = 300
    sft_lr: float = 3e-3
    sft_batch: int = 32
    phase: str = "rl"
    """The measured phase after the warm start: rl (GRPO) | sft | pretrain."""
    rl_steps: int = 60
    """Steps of the measured phase (RL, or SFT/pretrain with phase=sft|pretrain)."""
    rl_lr: float = 1e-3
    """Learning rate of the measured phase (constant)."""
    precision: str = "fp32"
    """fp32 master weights, or bf16: the model (and optimizer state) in bf16 for the measured phase."""
    prompts_per_step: int = 8
    """Prompts per rank per RL step (each sampled group_size times)."""
    grpo: dict = field(default_factory=dict)
    """GRPOConfig fields: group_size, max_new_tokens, temperature, clip_eps, beta."""
    comm: str = "local"
    optimizer: str = "aspg"
    density: float = 0.01
    value_codec: str = "bf16"
    aspg: dict = field(default_factory=dict)
    """Extra ASPG options (warmup_steps, importance, budget, switch, ...)."""
    coordinator: str = ""
    powersgd_rank: int = 1
    lora_rank: int = 0
    """> 0: the measured phase trains LoRA adapters of this rank (peft, the `trl` extra) on the
    attention and MLP matrices instead of the full model; only the adapters are communicated."""
    kind_density: dict = field(default_factory=dict)
    """ASPG density per layer kind (attention, mlp, norm, embedding, other), e.g. {norm: 1.0};
    kinds not named use `density`. Selection then runs per tensor (budget per_tensor)."""
    dense_baseline_every: int = 10
    tracker_mode: str = "fp32"
    k_steps: list = field(default_factory=lambda: [10])
    """Accumulated sparsity between weights K steps apart, for each K."""
    per_param_stats: bool = True
    """Per-parameter sparsity keys in StepStats (per layer kind and global are always there)."""
    hot_window: int = 0
    """Hot-parameter map window in steps (0: off); heatmaps go to RUN_DIR/hot_maps_rank{R}.npz."""
    hot_definition: str = "bf16_view"
    rank_every: int = 0
    """Gradient rank (per matrix, and the stacked method over `rank_stack` steps) every N steps (0: off)."""
    rank_stack: int = 8
    checkpoint_every: int = 0
    """Save RUN_DIR/checkpoint_rank{R}.pt every N measured steps (0: never)."""
    resume: bool = False
    """Continue from RUN_DIR's checkpoint (same config): exact, the warm start is not repeated."""
    eval_size: int = 200
    metrics_port: int = -1
    """Prometheus port (0: any free port; -1: off). Each process serves on metrics_port + its LOCAL_RANK
    (its index on its node), so every node exposes the same ports."""
    console_every: int = 10

    def __post_init__(self):
        for f in dataclasses.fields(self):  # YAML reads 1e-5 (no dot) as a string; numbers given as strings are converted
            v = getattr(self, f.name)
            if f.type in ("float", "int") and isinstance(v, str):
                try:
                    setattr(self, f.name, float(v) if f.type == "float" else int(v))
                except ValueError:
                    raise ValueError(f"{f.name} must be a {f.type}, got {v!r}") from None
        if self.comm not in COMMS:
            raise ValueError(f"comm must be one of {COMMS}, got {self.comm!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.kind_density and self.optimizer != "aspg":
            raise ValueError("kind_density sets ASPG's per-layer-kind density: it needs optimizer=aspg")
        if not all(0 < float(v) <= 1 for v in self.kind_density.values()):
            raise ValueError(f"kind_density values must be in (0, 1], got {self.kind_density}")
        if self.rank_every < 0 or self.rank_stack < 2 or self.hot_window < 0 or self.checkpoint_every < 0:
            raise ValueError("need rank_every >= 0, rank_stack >= 2, hot_window >= 0, checkpoint_every >= 0")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if any(int(k) < 2 for k in self.k_steps):
            raise ValueError(f"k_steps must be >= 2, got {self.k_steps}")
        if self.comm in ("aspg", "coordinator", "local") and self.optimizer != "aspg" and self.comm != "local":
            raise ValueError(f"comm={self.comm!r} is ASPG's exchange: use optimizer=aspg (or comm=ddp/hook/powersgd)")
        if self.comm in ("ddp", "hook", "powersgd") and self.optimizer == "aspg":
            raise ValueError(f"comm={self.comm!r} wraps the model in DDP; ASPG does its own communication (use comm=aspg)")
        if self.comm == "coordinator" and not self.coordinator:
            raise ValueError("comm=coordinator needs coordinator=tcp://HOST:PORT")
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.sft_steps < 0 or self.rl_steps < 0 or self.prompts_per_step < 1 or self.sft_batch < 1:
            raise ValueError("steps must be >= 0 and batch sizes >= 1")
        GRPOConfig(**self.grpo)  # validates

    @classmethod
    def from_args(cls, argv: list[str]) -> "TrainConfig":
        """`--config FILE.yaml` (optional) then `key=value` overrides (values parsed as YAML)."""
        import yaml

        values: dict = {}
        args = list(argv)
        if "--config" in args:
            i = args.index("--config")
            values.update(yaml.safe_load(Path(args[i + 1]).read_text()) or {})
            del args[i:i + 2]
        names = {f.name for f in dataclasses.fields(cls)}
        for a in args:
            if "=" not in a:
                raise ValueError(f"expected key=value, got {a!r}")
            k, v = a.split("=", 1)
            if k.split(".")[0] not in names:
                raise ValueError(f"unknown config key {k!r}; known: {sorted(names)}")
            if "." in k:  # nested dict key, e.g. grpo.group_size=4
                top, sub = k.split(".", 1)
                values.setdefault(top, {})[sub] = yaml.safe_load(v)
            else:
                values[k] = yaml.safe_load(v)
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return cls(**values)


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
            dist.init_process_group("gloo")
        self.rank, self.world = _dist_info()
        if cfg.comm == "local" and self.world > 1:
            raise ValueError("comm=local with several processes: pick aspg, coordinator, ddp, hook or powersgd")
        torch.manual_seed(cfg.seed)
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            (self.run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        self.task = make_task(cfg.task, **cfg.task_kwargs)
        self.reward = make_reward(cfg.reward)
        self.data = datasets(self.task, seed=cfg.seed + 1000 * self.rank)  # each rank its own prompts
        self.eval_set = datasets(self.task, seed=10**6 + cfg.seed, n_pretrain=0, n_sft=0, n_rl=cfg.eval_size)["rl"]
        tok = char_tokenizer() if cfg.model in ("tiny", "small", "medium") else None
        self.model, self.tok = build_model(cfg.model, tok, seed=cfg.seed)  # same init on every rank
        self.grpo = GRPOConfig(**cfg.grpo)
        self.prom = None
        self.ck = self._load_checkpoint() if cfg.resume else None
        if self.ck is not None:
            self._truncate_stats(self.ck["step"])
        self.recorder = self._make_recorder(append=self.ck is not None)
        self.summary: dict = {}
        self.gen = torch.Generator().manual_seed(cfg.seed + 7919 * self.rank)

    def _make_recorder(self, append: bool) -> Recorder:
        """JSONL (appending on a resume), console on rank 0, Prometheus when metrics_port >= 0."""
        cfg = self.cfg
        sinks = [JsonlSink(self.run_dir / f"stats_rank{self.rank}.jsonl", mode="a" if append else "w")]
        if self.rank == 0:
            sinks.append(ConsoleSink(every=cfg.console_every))
        if cfg.metrics_port >= 0:
            local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
            self.prom = PrometheusSink(port=cfg.metrics_port + local_rank if cfg.metrics_port else 0, rank=self.rank,
                                       run=self.run_dir.name, addr="0.0.0.0" if self.world > 1 else "127.0.0.1")
            sinks.append(self.prom)
        return Recorder(sinks)

    # ------------------------------------------------------------------ phases
    def _ddp(self, **kw):
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(self.model, **kw) if self.world > 1 else self.model

    def sft(self) -> None:
        cfg = self.cfg
        if not cfg.sft_steps:
            return
        model = self._ddp()
        opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.sft_lr)
        rng = random.Random(cfg.seed + self.rank)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / cfg.sft_steps)))
        for step in range(cfg.sft_steps):
            batch = rng.sample(self.data["sft"], cfg.sft_batch)
            loss = sft_loss(model, self.tok, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if self.rank == 0 and cfg.console_every <= cfg.sft_steps and (step % 100 == 0 or step == cfg.sft_steps - 1):
                print(f"sft step {step:4d} | loss {float(loss.detach()):.4f}", flush=True)

    def _rl_optimizer(self):
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.kind_density:  # one param group per layer kind, each with its own density
            from ..track.layers import named_parameter_kinds

            kinds = named_parameter_kinds(self.model)
            groups: dict[str, list] = {}
            for name, p in self.model.named_parameters():
                if not p.requires_grad:
                    continue
                groups.setdefault(kinds.get(name, "other"), []).append(p)
            params = [{"params": ps, "density": float(cfg.kind_density.get(kind, cfg.density))} for kind, ps in groups.items()]
        if cfg.optimizer == "aspg":
            from ..optim import ASPG

            transport = None
            if cfg.comm == "aspg" and self.world > 1:
                from ..exchange import TorchDistTransport

                transport = TorchDistTransport()
            elif cfg.comm == "coordinator":
                from ..exchange import CoordinatorTransport

                transport = CoordinatorTransport(cfg.coordinator, f"trainer-{self.rank}")
            return ASPG(params, lr=cfg.rl_lr, density=cfg.density, value_codec=cfg.value_codec, transport=transport,
                        dense_baseline_every=cfg.dense_baseline_every if self.world > 1 else 0, seed=cfg.seed + self.rank,
                        **({"budget": "per_tensor"} if cfg.kind_density else {}), **cfg.aspg)
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=cfg.rl_lr)
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.rl_lr, momentum=0.9)
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=cfg.rl_lr, scale_parameter=False, relative_step=False)

    def _rl_model(self, saved_hook_state=None):
        """The model the measured phase runs (DDP-wrapped for DDP modes) and its comm-hook state
        (a checkpoint's, on resume)."""
        cfg = self.cfg
        if cfg.comm in ("local", "aspg", "coordinator") or self.world == 1:
            return self.model, None
        if cfg.comm == "ddp":
            return self._ddp(), None
        if cfg.comm == "hook":
            from ..exchange import SparseHookState, sparse_topk_hook

            m = self._ddp()
            state = saved_hook_state or SparseHookState(density=cfg.density, value_codec=cfg.value_codec, seed=cfg.seed + self.rank)
            m.register_comm_hook(state, sparse_topk_hook)
            return m, state
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

        m = self._ddp(bucket_cap_mb=10_000)  # one bucket: powerSGD_hook on gloo breaks with several
        state = saved_hook_state or psgd.PowerSGDState(process_group=None, matrix_approximation_rank=cfg.powersgd_rank,
                                                      start_powerSGD_iter=2)
        m.register_comm_hook(state, psgd.powerSGD_hook)
        return m, state

    def _phase_loss(self, model, ref, rng: random.Random):
        """One batch of the measured phase: (loss, metrics)."""
        cfg = self.cfg
        if cfg.phase == "rl":
            batch = rng.sample(self.data["rl"], cfg.prompts_per_step)
            return grpo_loss(model, ref, self.tok, self.task, batch, self.reward, self.grpo, self.gen)
        batch = rng.sample(self.data[cfg.phase], cfg.sft_batch)
        loss = (sft_loss if cfg.phase == "sft" else pretrain_loss)(model, self.tok, batch)
        return loss, {"train/loss": float(loss.detach())}

    def _checkpoint_path(self) -> Path:
        return self.run_dir / f"checkpoint_rank{self.rank}.pt"

    def _save_checkpoint(self, step: int, opt, ref, hook_state, rng: random.Random) -> None:
        state = {"step": step, "model": self.model.state_dict(), "optimizer": opt.state_dict(),
                 "ref": ref.state_dict() if ref is not None else None, "hook_state": hook_state,
                 "rng": rng.getstate(), "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                 "summary": dict(self.summary), "config": dataclasses.asdict(self.cfg)}
        tmp = self._checkpoint_path().with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self._checkpoint_path())  # atomic: a crash mid-save keeps the previous checkpoint

    def _load_checkpoint(self) -> dict:
        path = self._checkpoint_path()
        if not path.exists():
            raise FileNotFoundError(f"resume=true but there is no checkpoint at {path}")
        ck = torch.load(path, weights_only=False)
        mine = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in RESUME_MAY_CHANGE}
        theirs = {k: v for k, v in ck["config"].items() if k not in RESUME_MAY_CHANGE}
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(f"checkpoint {path} was written with a different config (keys {diff}); resume needs the same")
        return ck

    def _cast(self, module):
        return module.to(torch.bfloat16) if self.cfg.precision == "bf16" else module

    def _add_lora(self) -> None:
        """Freeze the model and add LoRA adapters (GPT-2's Conv1D layers: fan_in_fan_out)."""
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ImportError("lora_rank > 0 needs peft: pip install 'sparsecomm[trl]'") from None
        r = self.cfg.lora_rank
        cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
                         fan_in_fan_out=True, init_lora_weights=True)
        torch.manual_seed(self.cfg.seed)  # the same adapter init on every rank
        self.model = get_peft_model(self.model, cfg)

    def rl(self, ck: dict | None = None) -> None:
        """The measured phase (GRPO, or SFT / pretraining with phase=sft|pretrain), from a checkpoint if given."""
        cfg = self.cfg
        start = 0
        ref_source = self.model  # the reference policy is the warm-started model, without adapters
        if cfg.lora_rank:
            self._add_lora()
        if ck is None:
            self._cast(self.model)
            self.summary["eval_accuracy_before_rl"] = evaluate(self.model, self.tok, self.task, self.eval_set,
                                                               self.grpo.max_new_tokens)
            ref = copy.deepcopy(ref_source).eval().requires_grad_(False) if self.grpo.beta > 0 and cfg.phase == "rl" else None
        else:
            self._cast(self.model).load_state_dict(ck["model"])
            ref = None
            if ck["ref"] is not None:
                ref = copy.deepcopy(ref_source).eval().requires_grad_(False)
                ref.load_state_dict(ck["ref"])
            self.summary.update(ck["summary"])
            start = ck["step"]
        model, hook_state = self._rl_model(None if ck is None else ck["hook_state"])
        opt = self._rl_optimizer()
        rng = random.Random(cfg.seed + 31 * self.rank)
        if ck is not None:
            opt.load_state_dict(ck["optimizer"])
            rng.setstate(ck["rng"])
            self.gen.set_state(ck["gen"])
            torch.set_rng_state(ck["torch_rng"])
        tracker = SparsityTracker(self.model, mode=cfg.tracker_mode, k_steps=cfg.k_steps, per_param=cfg.per_param_stats,
                                  hot_window=cfg.hot_window, hot_definition=cfg.hot_definition if cfg.hot_window else None)
        ranks = RankTracker(self.model, every=cfg.rank_every) if cfg.rank_every else None
        stack: list[torch.Tensor] = []  # the plan's stacked method: the last rank_stack flattened gradients
        comm = CommTracker(cfg.dense_baseline_every if self.world > 1 and cfg.optimizer != "aspg" else 0)
        numel = sum(p.numel() for p in self.model.parameters() if p.requires_grad)  # what is communicated
        for step in range(start + 1, cfg.rl_steps + 1):
            t0 = time.perf_counter()
            loss, m = self._phase_loss(model, ref, rng)
            opt.zero_grad()
            t1 = time.perf_counter()
            loss.backward()  # DDP modes communicate here
            t2 = time.perf_counter()
            stats = StepStats(step=step, rank=self.rank, world_size=self.world, run=self.run_dir.name, metrics=m)
            if ranks is not None:
                stats.update(self._ranks(ranks, stack, step))
            opt.step()  # ASPG communicates here
            stats.update(tracker.step(lr=cfg.rl_lr))
            if cfg.optimizer == "aspg":
                stats.update(opt.last_metrics)
            else:
                if hook_state is not None and hasattr(hook_state, "last_metrics"):
                    stats.update(hook_state.last_metrics)
                elif self.world > 1 and cfg.comm == "powersgd":
                    stats.update({"comm/sent_bytes": powersgd_bytes(self.model, cfg.powersgd_rank, self.world, step),
                                  "comm/path": "powersgd", "comm/bytes_are": "formula"})
                elif self.world > 1:
                    stats.update({"comm/sent_bytes": ring_allreduce_bytes(numel, 4, self.world), "comm/path": "dense"})
                comm.dense_baseline(step, list(self.model.parameters()))
                stats.update({k: v for k, v in comm.collect(numel, 4, self.world).items() if k.startswith("timing/dense")})
                stats.update({"timing/backward_with_comm_s": t2 - t1})
            stats.update({"comm/dense_equiv_bytes": ring_allreduce_bytes(numel, 4, self.world),
                          "timing/step_s": time.perf_counter() - t0, "train/phase": cfg.phase})
            self.recorder.record(stats)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                self._save_checkpoint(step, opt, ref, hook_state, rng)
        if tracker.hot is not None:
            tracker.hot.save(self.run_dir / f"hot_maps_rank{self.rank}.npz")
        self.summary["eval_accuracy_after_rl"] = evaluate(self.model, self.tok, self.task, self.eval_set, self.grpo.max_new_tokens)

    def _ranks(self, ranks: RankTracker, stack: list, step: int) -> dict:
        """Per-matrix gradient rank every rank_every steps, and the plan's stacked-gradient SVD over
        the rank_stack steps leading up to it (bounded by rank_stack by construction)."""
        k = self.cfg.rank_stack
        if step % ranks.every == 0 or step % ranks.every > ranks.every - k:
            stack.append(torch.cat([p.grad.detach().float().reshape(-1) for p in ranks.params.values() if p.grad is not None]))
        out = ranks.observe_gradients(step, tokens=None)
        if out:
            out.update(stacked_rank(stack[-k:]))
            stack.clear()
        return out

    def train(self) -> dict:
        t0 = time.perf_counter()
        if self.ck is None:
            self.sft()
        self.rl(self.ck)
        self.summary["wall_s"] = time.perf_counter() - t0
        self.summary.update(summarize(self.run_dir / f"stats_rank{self.rank}.jsonl"))
        if self.rank == 0:
            (self.run_dir / "summary.json").write_text(json.dumps(self.summary, indent=2))
        return self.summary

    def _truncate_stats(self, step: int) -> None:
        """On resume, drop rows written after the checkpoint (they will be recomputed, identically)."""
        path = self.run_dir / f"stats_rank{self.rank}.jsonl"
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step] \
            if path.exists() else []
        path.write_text("".join(line + "\n" for line in keep))

    def close(self) -> None:
        try:
            self.recorder.close()
        finally:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()  # avoids aborts at interpreter exit under torchrun


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


def format_summary(s: dict, cfg: TrainConfig, world: int) -> str:
    """The demo's closing lines: reward, sparsity by definition, bytes and time against dense."""
    ratio = s["dense_equiv_bytes_total"] / s["sent_bytes_total"] if s.get("sent_bytes_total") else float("nan")
    lines = [
        f"\n=== {world} worker(s), {cfg.model} on {cfg.task} {cfg.task_kwargs}, RL with {cfg.optimizer} over {cfg.comm}"
        + (f" at density {cfg.density:g}" if cfg.optimizer == "aspg" else "") + " ===",
        f"reward (mean of the first / last 25 RL steps, sampled): {s['reward_first']:.3f} -> {s['reward_last']:.3f}",
        f"greedy exact-match accuracy before / after RL:      {s['eval_accuracy_before_rl']:.3f} -> {s['eval_accuracy_after_rl']:.3f}",
        f"update sparsity per step (fraction of weights unchanged): fp32 exact {s['sparsity_fp32_exact']:.2%}, "
        f"bf16 view {s['sparsity_bf16_view']:.2%}",
        f"bytes sent per worker (encoded buffers, headers included): {s['sent_bytes_total']:,.0f} vs dense ring "
        f"all-reduce {s['dense_equiv_bytes_total']:,.0f} ({ratio:.0f}x fewer)",
    ]
    if s.get("exchange_s_mean") == s.get("exchange_s_mean") and s.get("dense_allreduce_s_mean") == s.get("dense_allreduce_s_mean"):
        lines.append(f"time per exchange: sparse {s['exchange_s_mean'] * 1000:.1f} ms (select..apply) vs a dense all_reduce "
                     f"of the same parameters measured in this run {s['dense_allreduce_s_mean'] * 1000:.1f} ms")
    lines.append(f"wall clock {s['wall_s']:.0f} s; stats in {cfg.run_dir}/stats_rank*.jsonl (sparsecomm report {cfg.run_dir})")
    return "\n".join(lines)


def summarize(jsonl: Path, window: int = 25) -> dict:
    from ..track import read_jsonl

    rows = [s.metrics for s in read_jsonl(jsonl)]
    if not rows:
        return {}

    def mean(key, rs):
        v = [r[key] for r in rs if isinstance(r.get(key), (int, float))]
        return sum(v) / len(v) if v else float("nan")

    w = max(1, min(window, len(rows) // 4))
    out = {"reward_first": mean("train/reward", rows[:w]), "reward_last": mean("train/reward", rows[-w:]),
           "sparsity_fp32_exact": mean("sparsity/fp32_exact/global", rows),
           "sparsity_bf16_view": mean("sparsity/bf16_view/global", rows),
           "sent_bytes_total": sum(r.get("comm/sent_bytes", 0) for r in rows),
           "dense_equiv_bytes_total": sum(r.get("comm/dense_equiv_bytes", 0) for r in rows),
           "exchange_s_mean": mean("timing/exchange_s", rows), "dense_allreduce_s_mean": mean("timing/dense_allreduce_s", rows)}
    return out
