"""The training loop: SFT warm start, then a measured phase (GRPO by default), under any
communication mode, fully tracked.

    cfg = TrainConfig.from_args(["--config", "launch/recipes/demo.yaml", "rl_steps=50"])
    trainer = Trainer(cfg); trainer.train(); trainer.close()

The recipe (TrainConfig, every field documented) is sparsecomm.rl.config; the device, backend,
process group, DDP wrapping, optimizer, transport and per-mode metrics are built by
sparsecomm.rl.build; this module is the loop. On a CUDA device (`device=auto` on a GPU host) the
model, optimizer state, sampling and generation run on cuda:LOCAL_RANK over NCCL; step timings
synchronize the device first so they measure the work, not its launch.

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
from pathlib import Path

import torch
import torch.distributed as dist

from ..dist_utils import shutdown_process_group
from ..track import (CommTracker, ConsoleSink, JsonlSink, PrometheusSink, Recorder, SparsityTracker, StepStats,
                     TensorBoardSink, WandbSink)
from ..track.rank import RankTracker, stacked_rank
from . import build
from .build import powersgd_bytes  # noqa: F401  (re-exported: benchmarks cite trainer.powersgd_bytes)
from .config import COMMS, OPTIMIZERS, PHASES, PRECISIONS, RESUME_MAY_CHANGE, TrainConfig  # noqa: F401  (re-exported)
from .losses import GRPOConfig, evaluate, grpo_loss, pretrain_loss, sft_loss
from .models import build_model, char_tokenizer
from .tasks import datasets, heldout_set, make_reward, make_task


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        # device and backend first, and checked before joining the job: a bad pair fails here, not in a collective
        self.device = build.select_device(cfg.device)
        self.backend = build.select_backend(cfg.backend, self.device)
        self.rank, self.world = build.init_distributed(self.backend, self.device)
        if cfg.comm == "local" and self.world > 1:
            raise ValueError("comm=local with several processes: pick aspg, coordinator, ddp, hook or powersgd")
        # engine=fsdp2: the RxS mesh is checked against the world and the hosts now, on every rank, not after SFT
        self.mesh = build.fsdp2_mesh(cfg) if cfg.engine == "fsdp2" and self.world > 1 else None
        torch.manual_seed(cfg.seed)
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.runtime = build.runtime_info(self.device, self.backend, self.world)
        if self.rank == 0:
            (self.run_dir / "config.json").write_text(json.dumps({**dataclasses.asdict(cfg), "runtime": self.runtime}, indent=2))
        self.task = make_task(cfg.task, **cfg.task_kwargs)
        self.reward = make_reward(cfg.reward)
        # each rank its own prompts; with heldout_fraction > 0 none of them is an eval prompt on any rank
        self.data = datasets(self.task, seed=cfg.seed + 1000 * self.rank, heldout_fraction=cfg.heldout_fraction)
        if cfg.heldout_fraction > 0:
            self.eval_set = heldout_set(self.task, 10**6 + cfg.seed, cfg.eval_size, cfg.heldout_fraction)
            seen = {ex.prompt for split in self.data.values() for ex in split}
            if any(ex.prompt in seen for ex in self.eval_set):  # by construction; checked because results rest on it
                raise RuntimeError("held-out eval prompts found in the training data")
        else:
            self.eval_set = datasets(self.task, seed=10**6 + cfg.seed, n_pretrain=0, n_sft=0, n_rl=cfg.eval_size)["rl"]
        tok = char_tokenizer() if cfg.model in ("tiny", "small", "medium") else None
        self.model, self.tok = build_model(cfg.model, tok, seed=cfg.seed)  # same init on every rank (made on the CPU)
        self.model.to(self.device)
        self.grpo = GRPOConfig(**cfg.grpo)
        self.prom = None
        self.ck = self._load_checkpoint() if cfg.resume else None
        if self.ck is not None:
            self._truncate_stats(self.ck["step"])
        self.recorder = self._make_recorder(append=self.ck is not None)
        self.summary: dict = {"runtime": self.runtime}
        # a CPU generator on purpose: it only draws each step's sampling seed (torch.manual_seed seeds
        # CUDA too), so the seed stream is the same whatever the device
        self.gen = torch.Generator().manual_seed(cfg.seed + 7919 * self.rank)
        # CUDA runs asynchronously: without a sync, perf_counter would time kernel launches
        self._sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

    def _make_recorder(self, append: bool) -> Recorder:
        """JSONL (appending on a resume), console on rank 0, Prometheus when metrics_port >= 0, TensorBoard
        and W&B (offline) when asked for."""
        cfg = self.cfg
        sinks = [JsonlSink(self.run_dir / f"stats_rank{self.rank}.jsonl", mode="a" if append else "w")]
        if self.rank == 0:
            sinks.append(ConsoleSink(every=cfg.console_every))
        if cfg.metrics_port >= 0:
            local_rank = build.local_rank()
            self.prom = PrometheusSink(port=cfg.metrics_port + local_rank if cfg.metrics_port else 0, rank=self.rank,
                                       run=self.run_dir.name, addr="0.0.0.0" if self.world > 1 else "127.0.0.1")
            sinks.append(self.prom)
        if cfg.tensorboard:
            sinks.append(TensorBoardSink(self.run_dir / "tensorboard" / f"rank{self.rank}"))
        if cfg.wandb_project:
            sinks.append(WandbSink(project=cfg.wandb_project, run_dir=self.run_dir, name=f"{self.run_dir.name}-rank{self.rank}"))
        return Recorder(sinks)

    # ------------------------------------------------------------------ phases
    def sft(self) -> None:
        cfg = self.cfg
        if not cfg.sft_steps:
            return
        model = build.wrap_ddp(self.model, self.device, self.world)
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

    def _phase_loss(self, model, ref, rng: random.Random):
        """One batch of the measured phase: (loss, metrics)."""
        cfg = self.cfg
        if cfg.phase == "rl":
            batch = rng.sample(self.data["rl"], cfg.prompts_per_step)
            loss, m = grpo_loss(model, ref, self.tok, self.task, batch, self.reward, self.grpo, self.gen)
            G = self.grpo.group_size  # every sampled sequence: its prompt and completion positions enter the forward
            m["train/batch_tokens"] = G * (self._tokens(e.prompt for e in batch) + len(batch) * m["train/completion_tokens"])
            return loss, m
        batch = rng.sample(self.data[cfg.phase], cfg.sft_batch)
        loss = (sft_loss if cfg.phase == "sft" else pretrain_loss)(model, self.tok, batch)
        tokens = self._tokens(e.prompt + e.answer for e in batch) + len(batch)  # + <eos> each
        return loss, {"train/loss": float(loss.detach()), "train/batch_tokens": float(tokens)}

    def _tokens(self, texts) -> int:
        return sum(len(self.tok(t, add_special_tokens=False)["input_ids"]) for t in texts)

    def _checkpoint_path(self) -> Path:
        return self.run_dir / f"checkpoint_rank{self.rank}.pt"

    def _save_checkpoint(self, step: int, opt, ref, hook_state, rng: random.Random, whole=None) -> None:
        transport = getattr(opt, "transport", None)  # the coordinator's: push counter and outbox mark
        state = {"whole_run": None if whole is None else {"start": whole.start, "tokens": whole.tokens},
                 "step": step, "model": self.model.state_dict(), "optimizer": opt.state_dict(),
                 "transport": transport.state_dict() if hasattr(transport, "state_dict") else None,
                 "ref": ref.state_dict() if ref is not None else None, "hook_state": hook_state,
                 "rng": rng.getstate(), "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                 "summary": dict(self.summary), "config": dataclasses.asdict(self.cfg)}
        tmp = self._checkpoint_path().with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self._checkpoint_path())  # atomic: a crash mid-save keeps the previous checkpoint

    def _load_checkpoint(self) -> dict:
        path = self._checkpoint_path()
        if not path.exists():
            raise FileNotFoundError(f"resume=true but there is no checkpoint at {path}")
        ck = torch.load(path, map_location="cpu", weights_only=False)  # RNG states must stay host tensors; load_state_dict moves the rest
        mine = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in RESUME_MAY_CHANGE}
        # keys added since the checkpoint was written (device, backend) compare as their defaults
        defaults = dataclasses.asdict(TrainConfig())
        theirs = {k: v for k, v in {**defaults, **ck["config"]}.items() if k not in RESUME_MAY_CHANGE}
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
        self.model = get_peft_model(self.model, cfg).to(self.device)

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
            self.summary["runtime"] = self.runtime  # what the resumed part ran on
            start = ck["step"]
        relay = None  # engine=deepspeed zero_stage=3 rollout_relay=...: this rank's publisher
        if cfg.engine == "deepspeed":  # the engine runs backward and step; opt is its DeepSpeedStep
            model, opt, hook_state = build.build_deepspeed(cfg, self.model, self.rank, self.world, self.device)
            if cfg.rollout_relay:
                from ..integrations.deepspeed import relay_publisher

                relay = relay_publisher(model, cfg.rollout_relay)
                relay.publish()  # version 1: every rank's whole partition (the anchor)
        else:
            model, hook_state = build.build_rl_model(cfg, self.model, self.device, self.rank, self.world,
                                                     None if ck is None else ck["hook_state"], mesh=self.mesh)
            opt = build.build_optimizer(cfg, self.model, self.rank, self.world, self.device, mesh=self.mesh)
        rng = random.Random(cfg.seed + 31 * self.rank)
        if ck is not None:
            opt.load_state_dict(ck["optimizer"])
            if ck.get("transport") is not None:  # after the optimizer: the outbox's counted pushes leave its residual
                opt.transport.load_state_dict(ck["transport"])
            rng.setstate(ck["rng"])
            self.gen.set_state(ck["gen"])
            torch.set_rng_state(ck["torch_rng"])
            if ck.get("cuda_rng") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(ck["cuda_rng"], self.device)
        sharded = cfg.engine == "fsdp2" or (cfg.engine == "deepspeed" and cfg.zero_stage == 3)
        tracked = build.LocalShards(self.model) if sharded else self.model  # DTensors / ZeRO-3: local shards
        tracker = SparsityTracker(tracked, mode=cfg.tracker_mode, k_steps=cfg.k_steps, per_param=cfg.per_param_stats,
                                  hot_window=cfg.hot_window, hot_definition=cfg.hot_definition if cfg.hot_window else None)
        ranks = RankTracker(self.model, every=cfg.rank_every) if cfg.rank_every else None
        stack: list[torch.Tensor] = []  # the plan's stacked method: the last rank_stack flattened gradients
        # engine=fsdp2: the measured dense baseline all-reduces each rank's local shards across the replica
        # group (HSDP's cross-replica reduction); over the whole world the ranks' shard sizes differ
        comm = CommTracker(cfg.dense_baseline_every if self.world > 1 and cfg.optimizer != "aspg" else 0,
                           group=self.mesh["replicate"].get_group() if self.mesh is not None else None)
        whole = self._whole_run_rank(ck)
        # what is communicated (ZeRO-3 parameters are empty outside forward/backward: their ds_numel)
        numel = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters() if p.requires_grad)
        for step in range(start + 1, cfg.rl_steps + 1):
            self._sync()
            t0 = time.perf_counter()
            loss, m = self._phase_loss(model, ref, rng)
            opt.zero_grad()
            self._sync()
            t1 = time.perf_counter()
            getattr(opt, "backward", torch.Tensor.backward)(loss)  # DDP modes communicate here (DeepSpeed's engine too)
            self._sync()
            t2 = time.perf_counter()
            stats = StepStats(step=step, rank=self.rank, world_size=self.world, run=self.run_dir.name, metrics=m)
            if ranks is not None:  # a DDP gradient is already the sum over every rank's tokens
                tokens = m["train/batch_tokens"] * (self.world if cfg.comm in ("ddp", "hook", "powersgd") else 1)
                stats.update(self._ranks(ranks, stack, step, round(tokens)))
            if whole is not None:
                whole.observe_tokens(round(m["train/batch_tokens"]))
            opt.step()  # ASPG communicates here
            if relay is not None:  # this step's weights to the rollout workers, partition by partition
                sync = relay.publish()
                stats.update({"rollout/version": sync["version"], "rollout/sent_bytes": sync["sent_bytes"],
                              "rollout/changed_entries": sync["changed_entries"]})
            stats.update(tracker.step(lr=cfg.rl_lr))
            stats.update(build.comm_metrics(cfg, opt=opt, hook_state=hook_state, comm_tracker=comm, model=self.model,
                                            world=self.world, step=step, numel=numel, backward_s=t2 - t1))
            self._sync()
            stats.update({"timing/step_s": time.perf_counter() - t0, "train/phase": cfg.phase})
            self.recorder.record(stats)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                self._save_checkpoint(step, opt, ref, hook_state, rng, whole)
        if relay is not None:
            relay.send.close()
        if tracker.hot is not None:
            tracker.hot.save(self.run_dir / f"hot_maps_rank{self.rank}.npz")
        self.summary["eval_accuracy_after_rl"] = evaluate(self.model, self.tok, self.task, self.eval_set, self.grpo.max_new_tokens)
        self.summary["eval_heldout_fraction"] = cfg.heldout_fraction  # 0: eval prompts may overlap training
        if whole is not None:
            self.summary["whole_run_rank"] = self._finish_whole_run_rank(whole)

    def _whole_run_rank(self, ck: dict | None):
        """W_start snapshot for the whole-run update rank (from the checkpoint on a resume)."""
        if not self.cfg.whole_run_rank:
            return None
        from ..research.update_rank import WholeRunRank

        whole = WholeRunRank(self.model)
        if ck is not None and ck.get("whole_run") is not None:
            whole.start, whole.tokens = ck["whole_run"]["start"], ck["whole_run"]["tokens"]
        return whole

    def _finish_whole_run_rank(self, whole) -> dict:
        """The token bound counts every rank's tokens: the replicas apply the mean of all workers' updates
        (without a process group, e.g. coordinator workers, this worker's tokens only)."""
        if self.world > 1 and dist.is_available() and dist.is_initialized():
            t = torch.tensor([float(whole.tokens)], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            whole.tokens = int(t.item())
        return whole.finish()

    def _ranks(self, ranks: RankTracker, stack: list, step: int, tokens: int | None = None) -> dict:
        """Per-matrix gradient rank every rank_every steps, and the plan's stacked-gradient SVD over
        the rank_stack steps leading up to it (bounded by rank_stack by construction)."""
        k = self.cfg.rank_stack
        if step % ranks.every == 0 or step % ranks.every > ranks.every - k:
            stack.append(torch.cat([p.grad.detach().float().reshape(-1) for p in ranks.params.values() if p.grad is not None]))
        out = ranks.observe_gradients(step, tokens=tokens)
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
                shutdown_process_group()  # barrier (bounded), then destroy: no teardown under a peer's last collective


def format_summary(s: dict, cfg: TrainConfig, world: int) -> str:
    """The demo's closing lines: reward, sparsity by definition, bytes and time against dense."""
    ratio = s["dense_equiv_bytes_total"] / s["sent_bytes_total"] if s.get("sent_bytes_total") else float("nan")
    rt = s.get("runtime", {})
    where = f" on {rt['device']}" + (f" ({rt['backend']})" if rt.get("backend") else "") if rt else ""
    lines = [
        f"\n=== {world} worker(s){where}, {cfg.model} on {cfg.task} {cfg.task_kwargs}, RL with {cfg.optimizer} over {cfg.comm}"
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
           "exchange_s_mean": mean("timing/exchange_s", rows), "dense_allreduce_s_mean": mean("timing/dense_allreduce_s", rows),
           "batch_tokens_mean": mean("train/batch_tokens", rows)}  # per rank per step: the per-step gradient rank bound
    return out
