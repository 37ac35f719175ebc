"""ASPG: Adam-style updates, importance-ranked top-k, error feedback, sparse exchange.

One step on one worker (P workers, N parameters in all):

    m = b1 m + (1-b1) g ;  v = b2 v + (1-b2) g^2          Adam moments (worker-local)
    e += -lr * m_hat / (sqrt(v_hat) + eps)                 error-feedback buffer (worker-local)
    w *= 1 - lr * wd                                       decoupled weight decay: identical on every
                                                           replica, so applied locally, never sent
    s = b s + (1-b) g                                      signed EMA of the gradient (worker-local)
    every `local_steps` steps:
      d = top-k of e by |e * s|                            k = density * N, global or per tensor
      d = roundtrip(d) ; e -= d                            what receivers decode is what leaves e
      mean over workers of d  (sparse all-gather)          or of e (dense all-reduce), when cheaper
      w += mean                                            the same bits on every replica

Importance (`importance=`): the default "impact" ranks each entry by |e * s|, the first-order
loss change that applying its residual would bring (|e| is how far the entry is behind, |s| how
much the loss cares). Ranking by |e| alone ("magnitude") treats every entry alike, because Adam
normalises each entry's step to about lr: a LayerNorm gain that scales a whole channel waits as
long as one matrix entry, and the signed EMA of a noise-dominated gradient averages out, so
noise waits too. Measured on the demo job (benchmarks/results/convergence.md, 2 workers, 1%):
"impact" reaches dense AdamW's reward, "magnitude" stays below it; "ema_grad" (EMA of |g|
alone) and "random" are kept as controls.

Error feedback wraps the Adam update, the quantity actually compressed, not the raw gradient
(1-bit Adam's lesson); this is MicroAdam's (arXiv 2405.15593) and DGC's (arXiv 1712.01887)
structure with Adam instead of momentum SGD. With density 1.0 and one worker it is AdamW.

Per step, the path is chosen identically on every rank: a dense all-reduce of the whole buffer
when the predicted all-gather volume (P-1) x k x bytes/entry exceeds `fallback_margin` x the
ring all-reduce volume 2 (P-1)/P x N x 4 bytes (SparCML's rule: sparse wins only while
density x P stays small), during `warmup_steps` dense warm-up steps, or when density reaches 1.
With `switch="measured"` it also times both paths and takes the faster (see PathChooser): on
fast links selection and coding can cost more than the bytes they save. The dense path sends
everything, so it leaves nothing in the buffer.

State: Adam moments, the residual and the importance EMA are worker-local by design (each
describes that worker's own gradient stream, as in DGC and 1-bit Adam); weights, step counters
and every exchange decision are replicated and stay bit-identical across ranks.

    opt = ASPG(model.parameters(), lr=1e-4, density=0.01, transport=TorchDistTransport())
    loss.backward(); opt.step(); opt.zero_grad()
    stats.update(opt.last_metrics)          # comm/*, timing/* for the trackers
"""
from __future__ import annotations

import math
import time
from typing import Iterable

import torch
from torch.optim import Optimizer

from ..codec import VALUE_CODECS, encode, roundtrip_values
from ..compress import ErrorFeedback, RandomK, k_for, make_selector, split_flat
from ..delta import SparseDelta
from ..exchange.base import SWITCH_POLICIES, LocalTransport, PathChooser, Transport, apply_mean_
from ..track.comm import CommTracker, ring_allreduce_bytes

IMPORTANCE = ("magnitude", "ema_grad", "impact", "random")
BUDGETS = ("global", "per_tensor")


class ASPG(Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, density: float = 0.01, warmup_steps: int = 0,
                 adaptive_epsilon: float | None = None, min_density: float = 1e-4, max_density: float = 0.25,
                 budget: str = "global", local_steps: int = 1, importance: str = "impact", ema_beta: float = 0.9,
                 selector: str = "sampled", index_codec: str = "auto", value_codec: str = "bf16",
                 dense_fallback: bool = True, fallback_margin: float = 1.0, switch: str = "volume",
                 probe_every: int = 50, transport: Transport | None = None,
                 dense_baseline_every: int = 0, seed: int = 0):
        if lr < 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"bad Adam hyperparameters: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density}")
        if adaptive_epsilon is not None and not (0 < adaptive_epsilon < 1 and 0 < min_density <= max_density <= 1):
            raise ValueError("adaptive density needs 0 < adaptive_epsilon < 1 and 0 < min_density <= max_density <= 1")
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
        if importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {IMPORTANCE}, got {importance!r}")
        if local_steps < 1 or warmup_steps < 0 or fallback_margin <= 0 or not 0 <= ema_beta < 1:
            raise ValueError("need local_steps >= 1, warmup_steps >= 0, fallback_margin > 0, 0 <= ema_beta < 1")
        if value_codec not in VALUE_CODECS:
            raise ValueError(f"unknown value codec {value_codec!r}; choose from {sorted(VALUE_CODECS)}")
        if switch not in SWITCH_POLICIES:
            raise ValueError(f"switch must be one of {SWITCH_POLICIES}, got {switch!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.options = dict(density=density, warmup_steps=warmup_steps, adaptive_epsilon=adaptive_epsilon,
                            min_density=min_density, max_density=max_density, budget=budget, local_steps=local_steps,
                            importance=importance, ema_beta=ema_beta, selector=selector, index_codec=index_codec,
                            value_codec=value_codec, dense_fallback=dense_fallback, fallback_margin=fallback_margin,
                            switch=switch, probe_every=probe_every)
        self.chooser = PathChooser(switch, dense_fallback, fallback_margin, probe_every)
        self.transport = transport or LocalTransport()
        self.comm = CommTracker(dense_baseline_every, getattr(self.transport, "group", None))
        self.selector = RandomK(seed) if importance == "random" else make_selector(selector, **(
            {"seed": seed} if selector in ("sampled",) else {}))
        self._sample_gen = torch.Generator().manual_seed(seed + 1)

        # One flat fp32 buffer holds every parameter's residual (and importance score), so a
        # global budget selects once over the whole model; per-parameter state holds views.
        self._params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        if len({p.device for p in self._params}) > 1:
            raise ValueError("ASPG keeps one flat buffer: all parameters must be on one device")
        # a param group may carry its own "density" (e.g. one group per layer kind): per-tensor budgets only
        self._group_density = [g.get("density") for g in self.param_groups for p in g["params"] if p.requires_grad]
        if any(d is not None for d in self._group_density):
            if budget != "per_tensor":
                raise ValueError("param groups with their own 'density' need budget='per_tensor'")
            if not all(d is None or 0 < d <= 1 for d in self._group_density):
                raise ValueError(f"param-group densities must be in (0, 1], got {sorted(set(self._group_density) - {None})}")
        self._offsets, off = [], 0
        for p in self._params:
            self._offsets.append(off)
            off += p.numel()
        self.numel = off
        device = self._params[0].device if self._params else torch.device("cpu")
        self.ef = ErrorFeedback()
        self.ef.residuals["flat"] = torch.zeros(self.numel, dtype=torch.float32, device=device)
        self._score = torch.zeros(self.numel, device=device) if importance in ("ema_grad", "impact") else None
        self._bind_views()
        if hasattr(self.transport, "bind"):  # e.g. the coordinator transport: join, seed or sync weights
            self.transport.bind(self._params)
        self.steps = 0  # replicated: optimizer steps taken
        self.version = 0  # replicated: exchanges applied (the weights version)
        self.last_metrics: dict = {}

    # ------------------------------------------------------------------ state and layout
    def _bind_views(self) -> None:
        flat = self.ef.residuals["flat"]
        for p, off in zip(self._params, self._offsets):
            st = self.state[p]
            st["residual"] = flat[off:off + p.numel()].view_as(p)
            if self._score is not None:
                st["importance"] = self._score[off:off + p.numel()].view_as(p)

    def _layout(self) -> dict[int, tuple[int, tuple[int, ...]]]:
        return {i: (off, tuple(p.shape)) for i, (p, off) in enumerate(zip(self._params, self._offsets))}

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["aspg"] = {"steps": self.steps, "version": self.version, "options": dict(self.options),
                      "chooser": self.chooser.state_dict(),
                      "sample_gen": self._sample_gen.get_state(),
                      "selector_gen": getattr(self.selector, "generator", None) and self.selector.generator.get_state()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("aspg")
        if extra["options"] != self.options:
            raise ValueError(f"checkpoint was made with ASPG options {extra['options']}, this optimizer has {self.options}")
        super().load_state_dict(state_dict)
        flat = self.ef.residuals["flat"]
        for p, off in zip(self._params, self._offsets):  # loaded tensors are copies: move them into the flat buffers
            st = self.state[p]
            if "residual" in st:
                flat[off:off + p.numel()].copy_(st["residual"].reshape(-1))
            if self._score is not None and "importance" in st:
                self._score[off:off + p.numel()].copy_(st["importance"].reshape(-1))
        self._bind_views()
        self.steps, self.version = extra["steps"], extra["version"]
        self.chooser.load_state_dict(extra["chooser"])
        self._sample_gen.set_state(extra["sample_gen"])
        if extra["selector_gen"] is not None:
            self.selector.generator.set_state(extra["selector_gen"])

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.steps += 1
        t0 = time.perf_counter()
        with self.comm.phase("local_update"):
            self._local_update()
        if self.steps % self.options["local_steps"] == 0:
            self._exchange()
        self.comm.dense_baseline(self.steps, [self.ef.residuals["flat"]])
        metrics = self.comm.collect(self.numel, 4, self.transport.world_size)
        metrics["timing/optimizer_step_s"] = time.perf_counter() - t0
        self.last_metrics = metrics
        return loss

    def _local_update(self) -> None:
        """Adam moments and update into the residual; decoupled weight decay on the weights."""
        beta_ema = self.options["ema_beta"]
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None or not p.requires_grad:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ASPG does not support sparse gradients")
                st = self.state[p]
                if "step" not in st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                g = p.grad
                st["step"] += 1
                step = float(st["step"])
                p.mul_(1 - lr * wd)
                st["exp_avg"].lerp_(g, 1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                step_size = lr / (1 - b1 ** step)
                denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** step)).add_(eps)
                st["residual"].addcdiv_(st["exp_avg"], denom, value=-step_size)
                if self.options["importance"] == "ema_grad":
                    st["importance"].mul_(beta_ema).add_(g.abs(), alpha=1 - beta_ema)
                elif self.options["importance"] == "impact":  # signed EMA: noise averages out
                    st["importance"].lerp_(g.to(st["importance"].dtype), 1 - beta_ema)  # fp32 EMA of bf16 grads too

    def current_density(self) -> float:
        """This exchange's density: 1 in warm-up; adaptive if configured (agreed across ranks)."""
        o = self.options
        if self.steps <= o["warmup_steps"]:
            return 1.0
        if o["adaptive_epsilon"] is None:
            return o["density"]
        flat = self.ef.residuals["flat"]
        m = min(flat.numel(), 65536)
        sample = flat[torch.randint(flat.numel(), (m,), generator=self._sample_gen).to(flat.device)].abs()
        mass = torch.sort(sample, descending=True).values.cumsum(0)
        need = (1 - o["adaptive_epsilon"]) * float(mass[-1]) if m else 0.0
        frac = (int(torch.searchsorted(mass, torch.tensor([need], device=mass.device))[0]) + 1) / max(m, 1)
        density = min(max(frac, o["min_density"]), o["max_density"])
        if self.transport.world_size == 1:  # one worker, or the coordinator (which accepts any k per worker)
            return density
        agreed = torch.tensor([density], dtype=torch.float64, device=getattr(self.transport, "device", "cpu"))
        self.transport.all_reduce_mean_(agreed)  # collective peers must choose the same k and path
        return float(agreed)

    def choose_path(self, density: float) -> str:
        return self.chooser.choose(self.numel, density, self.transport.world_size,
                                   VALUE_CODECS[self.options["value_codec"]].bytes_per_value)

    def _tensor_densities(self, density: float) -> list[float]:
        """Each tensor's density this exchange: its group's, if set (warm-up excepted), else `density`."""
        if self.steps <= self.options["warmup_steps"]:
            return [1.0] * len(self._params)
        return [density if gd is None else gd for gd in self._group_density]

    def _exchange(self) -> None:
        c, o = self.comm, self.options
        density = self.current_density()
        per_tensor = self._tensor_densities(density)
        if o["budget"] == "per_tensor":  # what the per-tensor budgets add up to, for the path decision
            density = sum(k_for(p.numel(), d) for p, d in zip(self._params, per_tensor)) / max(self.numel, 1)
        path = self.choose_path(density)
        flat = self.ef.residuals["flat"]
        P = self.transport.world_size
        with c.phase("exchange"):
            if path == "dense":
                with c.phase("transfer"):
                    self.transport.all_reduce_mean_(flat)
                with c.phase("apply"):
                    for p, off in zip(self._params, self._offsets):
                        p.add_(flat[off:off + p.numel()].view_as(p).to(p.dtype))
                    flat.zero_()
                c.add_sent(ring_allreduce_bytes(self.numel, 4, P))
                c.add_received(ring_allreduce_bytes(self.numel, 4, P))
                c.note(path="dense", k=self.numel, density=1.0)
            else:
                with c.phase("select"):
                    d = self._select(density, per_tensor)
                    d = roundtrip_values(d, o["value_codec"])
                    self.ef.update("flat", d)
                d.step, d.base_version = self.steps, self.version
                with c.phase("encode"):
                    payload = encode(d, o["index_codec"], o["value_codec"])
                with c.phase("transfer"):
                    payloads = self.transport.all_gather_bytes(payload)
                # decode each worker's delta and add 1/P of it, rank by rank (no union needed)
                applied_k = apply_mean_(payloads, self.numel, self._add_flat_delta, c.timing_s)
                sent, recv = self.transport.wire_bytes([len(b) for b in payloads])
                c.add_sent(sent)
                c.add_received(recv)
                c.note(path="sparse", k=d.k, density=d.k / max(self.numel, 1), payload_bytes=len(payload),
                       applied_entries=applied_k)
        if self.options["switch"] == "measured":
            self.chooser.observe(path, self.transport.max_over_ranks(c.timing_s["exchange"]))
        self.version += 1

    def _select(self, density: float, per_tensor: list[float]) -> SparseDelta:
        flat = self.ef.residuals["flat"]
        if self.options["budget"] == "global":
            return self.selector.select(flat, k_for(self.numel, density), self._ranking(flat, self._score))
        parts_i, parts_v = [], []
        for p, off, pd in zip(self._params, self._offsets, per_tensor):
            view = flat[off:off + p.numel()]
            score = self._ranking(view, None if self._score is None else self._score[off:off + p.numel()])
            d = self.selector.select(view, k_for(p.numel(), pd), score)
            parts_i.append(d.indices + off)
            parts_v.append(d.values)
        return SparseDelta(torch.cat(parts_i), torch.cat(parts_v), (self.numel,), torch.float32)

    def _ranking(self, residual: torch.Tensor, score: torch.Tensor | None) -> torch.Tensor | None:
        """What top-k ranks by: |residual| (None), the EMA of |grad|, or the first-order loss change
        |residual * EMA(grad)| that sending the residual would bring ("impact")."""
        if self.options["importance"] == "impact":
            return (residual * score).abs_()
        return score

    def _add_flat_delta(self, d: SparseDelta, alpha: float) -> None:
        """weights += alpha * d, for a delta over the flat parameter space."""
        for p, part in zip(self._params, split_flat(d, self._layout()).values()):
            if part.k:
                part.add_to(p.data, alpha)
