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

The exchange is `exchange.pipeline.SparseExchange`, the same component the DDP hook uses. Per
step it picks, identically on every rank, a dense all-reduce of the whole buffer, an all-gather
of every worker's delta, or the split sparse all-reduce (reduce-scatter to shard owners, owner
top-k with owner-side error feedback, all-gather of the owners' pieces: ~2k entries per worker
whatever P is), by predicted bytes (`switch="volume"`) or also by measured time
(`switch="measured"`; see exchange/paths.py). Warm-up steps and density 1 are dense. The
residual is reduced only after the exchange that carries its delta succeeded.

Replicas: weight decay multiplies every trainable parameter on every replica each step, whether
or not it had a gradient on this rank (a branch or head unused on one rank must still decay the
same way everywhere), and nothing at all when weight_decay is 0. bf16/fp16 parameters keep an
fp32 master copy (`master_weights`, default on for them): the mean is added to the master and
the parameter rewritten from it, so entries below half a bf16 ulp accumulate instead of being
rounded away after their sender already removed them from its residual.

State: Adam moments, the residual and the importance EMA are worker-local by design (each
describes that worker's own gradient stream, as in DGC and 1-bit Adam); weights, master copies,
step counters and every exchange decision are replicated and stay bit-identical across ranks.
`state_dict` keeps the residual, importance and masters in their own dtype (outside the
per-parameter state, which torch's `load_state_dict` would cast to the parameter dtype), and the
exchange's selector generators, thresholds, path timings and split owner residuals: resume is exact.

`state_dtype="bf16"` keeps the residual and the importance EMA (and its ranking buffer) in bf16:
6 of ASPG's 20 bytes per fp32 parameter (moments 8, residual 4, importance 4, ranking 4) saved
per worker. The cost: bf16 has 8 significant bits, so an entry that waits long enough gains
updates below half its ulp; added with round-to-nearest they would vanish (an entry behind by
256 steps of lr would stop growing). They are added with stochastic rounding instead (a seeded
generator, part of the checkpoint): unbiased, so the residual's expectation is the exact sum and
nothing is lost on average, but not bit for bit. Sent values leave the residual exactly (bf16
and fp32 codecs send the residual's own bf16 value; for int8/int4/int2 e - q(e) is exact by
Sterbenz), and owner residuals handed back by the split path are added stochastically too. The
importance EMA rounds to nearest (a ranking only), so ema_beta > 0.99 is refused. The reward cost
on the convergence benchmark: benchmarks/results/convergence_state_bf16.md.

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

from ..codec import VALUE_CODECS
from ..compress import ErrorFeedback, add_stochastic_, k_for, subtract_sent_
from ..delta import SparseDelta
from ..exchange.paths import PATHS, SWITCH_POLICIES
from ..exchange.pipeline import FlatLayout, SparseExchange
from ..exchange.split import OWNER_SHARE
from ..exchange.transport import LocalTransport, Transport
from ..track.comm import CommTracker

IMPORTANCE = ("magnitude", "ema_grad", "impact", "random")
BUDGETS = ("global", "per_tensor")
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # residual and importance buffers


class ASPG(Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, density: float = 0.01, warmup_steps: int = 0,
                 adaptive_epsilon: float | None = None, min_density: float = 1e-4, max_density: float = 0.25,
                 budget: str = "global", local_steps: int = 1, importance: str = "impact", ema_beta: float = 0.9,
                 selector: str = "reuse", index_codec: str = "auto", value_codec: str = "bf16",
                 dense_fallback: bool = True, fallback_margin: float = 1.0, switch: str = "volume",
                 probe_every: int = 50, paths: tuple[str, ...] = PATHS, exact: bool = False, rebalance_every: int = 10,
                 owner_share: float = OWNER_SHARE,
                 master_weights: bool | None = None, state_dtype: str = "fp32", transport: Transport | None = None,
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
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {tuple(STATE_DTYPES)} (residual and importance), got {state_dtype!r}")
        if state_dtype == "bf16" and ema_beta > 0.99:  # bf16 has 8 significant bits: x * beta rounds back to x
            raise ValueError(f"state_dtype='bf16' keeps the importance EMA in bf16, where ema_beta={ema_beta} > 0.99 "
                             "freezes it (score x beta rounds back to score); use fp32 state or a smaller ema_beta")
        paths = tuple(p for p in paths if dense_fallback or p != "dense")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.options = dict(density=density, warmup_steps=warmup_steps, adaptive_epsilon=adaptive_epsilon,
                            min_density=min_density, max_density=max_density, budget=budget, local_steps=local_steps,
                            importance=importance, ema_beta=ema_beta, selector=selector, index_codec=index_codec,
                            value_codec=value_codec, dense_fallback=dense_fallback, fallback_margin=fallback_margin,
                            switch=switch, probe_every=probe_every, paths=list(paths), exact=exact,
                            rebalance_every=rebalance_every, owner_share=owner_share, state_dtype=state_dtype)
        self.transport = transport or LocalTransport()
        self.comm = CommTracker(dense_baseline_every, getattr(self.transport, "group", None))
        self.exchange = SparseExchange(self.transport, selector="randomk" if importance == "random" else selector,
                                       index_codec=index_codec, value_codec=value_codec, paths=paths, switch=switch,
                                       exact=exact, margin=fallback_margin, probe_every=probe_every,
                                       rebalance_every=rebalance_every, seed=seed, comm=self.comm,
                                       owner_share=owner_share)
        self._sample_gen = torch.Generator().manual_seed(seed + 1)

        # One flat buffer (fp32, or bf16 with state_dtype) holds every parameter's residual (and
        # importance score), so a global budget selects once over the whole model.
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
        low = (torch.bfloat16, torch.float16)
        use_master = [(p.dtype in low) if master_weights is None else (master_weights and p.dtype != torch.float32)
                      for p in self._params]
        self._masters = [p.detach().float().clone() if m else None for p, m in zip(self._params, use_master)]
        self.layout = FlatLayout(self._params, self._masters)
        self._index = {id(p): i for i, p in enumerate(self._params)}  # parameter -> its slot in the flat layout
        self.numel = self.layout.numel
        device = self._params[0].device if self._params else torch.device("cpu")
        sdt = STATE_DTYPES[state_dtype]
        self.ef = ErrorFeedback(sdt)
        self.ef.residuals["flat"] = torch.zeros(self.numel, dtype=sdt, device=device)
        self._score = torch.zeros(self.numel, dtype=sdt, device=device) if importance in ("ema_grad", "impact") else None
        # bf16 state: the generator of the stochastic rounding of residual updates, one stream per rank (the
        # residual is worker-local; correlated rounding would not average out in the mean); checkpointed
        rank = getattr(self.transport, "rank", 0)
        self._round_gen = (torch.Generator(device=device).manual_seed(seed + 2 + 1_000_003 * rank)
                           if sdt != torch.float32 else None)
        self._rank_buf: torch.Tensor | None = None  # |residual x score|, reused every exchange
        self._residual_views = self.layout.views(self.ef.residuals["flat"])
        self._score_views = self.layout.views(self._score) if self._score is not None else None
        if hasattr(self.transport, "bind"):  # e.g. the coordinator transport: join, seed or sync weights
            self.transport.bind(self._params, self.layout)  # through the layout: masters follow a resync
        self.steps = 0  # replicated: optimizer steps taken
        self.version = 0  # replicated: exchanges applied (the weights version)
        # replicated: the decoupled decay applied since the last exchange, as flat (start, stop, factor)
        # ops; a transport with `set_decay` (the coordinator) sends them, so its own copy decays alike
        self.decay_ops: list[tuple[int, int, float]] = []
        self.last_metrics: dict = {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["aspg"] = {"steps": self.steps, "version": self.version, "options": dict(self.options),
                      "residual": self.ef.residuals["flat"].clone(),
                      "score": None if self._score is None else self._score.clone(),
                      "masters": [None if m is None else m.clone() for m in self._masters],
                      "exchange": self.exchange.state_dict(), "sample_gen": self._sample_gen.get_state(),
                      "round_gen": None if self._round_gen is None else self._round_gen.get_state(),
                      "decay_ops": list(self.decay_ops)}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("aspg")
        if {"state_dtype": "fp32", **extra["options"]} != self.options:  # checkpoints from before state_dtype: fp32
            raise ValueError(f"checkpoint was made with ASPG options {extra['options']}, this optimizer has {self.options}")
        super().load_state_dict(state_dict)
        # residual, importance (fp32 or bf16 state) and fp32 masters travel outside the per-parameter state:
        # torch would cast them to the parameter dtype there
        self.ef.residuals["flat"].copy_(extra["residual"])
        if self._score is not None:
            self._score.copy_(extra["score"])
        for m, saved in zip(self._masters, extra["masters"]):
            if m is not None:
                m.copy_(saved)
        self.exchange.load_state_dict(extra["exchange"])
        self.steps, self.version = extra["steps"], extra["version"]
        self.decay_ops = [tuple(op) for op in extra.get("decay_ops", ())]
        self._sample_gen.set_state(extra["sample_gen"])
        if self._round_gen is not None:
            self._round_gen.set_state(extra["round_gen"])

    @property
    def chooser(self):
        """The path chooser of the flat buffer (timings and decisions), for inspection."""
        return self.exchange._key("flat", self.numel)["chooser"]

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
        metrics.update(self.state_memory())
        self.last_metrics = metrics
        return loss

    def state_memory(self) -> dict:
        """Bytes ASPG holds per worker, by buffer (the trackers export them as memory/*): Adam moments, the flat
        residual, the importance EMA and its ranking buffer (fp32, or bf16 with state_dtype), fp32 master weights; and on CUDA the
        device's peak allocated bytes so far (torch.cuda.max_memory_allocated), which includes the model."""
        def nbytes(ts) -> int:
            return sum(t.numel() * t.element_size() for t in ts if t is not None)

        moments = [t for st in self.state.values() for k, t in st.items() if k in ("exp_avg", "exp_avg_sq")]
        out = {"memory/aspg_moments_bytes": nbytes(moments),
               "memory/aspg_residual_bytes": nbytes([self.ef.residuals["flat"]]),
               "memory/aspg_importance_bytes": nbytes([self._score, self._rank_buf]),
               "memory/aspg_master_bytes": nbytes(self._masters)}
        out["memory/aspg_state_bytes"] = sum(out.values())
        dev = self.ef.residuals["flat"].device
        if dev.type == "cuda":
            out["memory/cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
        return out

    def _local_update(self) -> None:
        """Adam moments and update into the residual (foreach kernels); decoupled weight decay on the weights."""
        beta_ema, importance = self.options["ema_beta"], self.options["importance"]
        index = self._index
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            trainable = [p for p in group["params"] if p.requires_grad]
            if wd:  # every trainable parameter, gradient or not: replicated state only
                plain = [p for p in trainable if self._masters[index[id(p)]] is None]
                if plain:
                    torch._foreach_mul_(plain, 1 - lr * wd)
                for p in trainable:
                    m = self._masters[index[id(p)]]
                    if m is not None:
                        m.mul_(1 - lr * wd)
                        p.copy_(m)
                self._record_decay([index[id(p)] for p in trainable], 1 - lr * wd)
            ps = [p for p in trainable if p.grad is not None]
            if not ps:
                continue
            if any(p.grad.is_sparse for p in ps):
                raise RuntimeError("ASPG does not support sparse gradients")
            for p in ps:
                st = self.state[p]
                if "step" not in st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] += 1
            grads = [p.grad for p in ps]
            m1 = [self.state[p]["exp_avg"] for p in ps]
            m2 = [self.state[p]["exp_avg_sq"] for p in ps]
            steps = [float(self.state[p]["step"]) for p in ps]
            torch._foreach_lerp_(m1, grads, 1 - b1)
            torch._foreach_mul_(m2, b2)
            torch._foreach_addcmul_(m2, grads, grads, value=1 - b2)
            denom = torch._foreach_sqrt(m2)
            torch._foreach_div_(denom, [math.sqrt(1 - b2 ** s) for s in steps])
            torch._foreach_add_(denom, eps)
            res = [self._residual_views[index[id(p)]] for p in ps]
            scale = [-lr / (1 - b1 ** s) for s in steps]
            if self._round_gen is None:
                torch._foreach_addcdiv_(res, m1, denom, scale)
            else:  # bf16 state: the update in fp32, added with stochastic rounding (module docstring)
                for m, d, r, sc in zip(m1, denom, res, scale):  # into denom: no second model-sized fp32 buffer
                    torch.div(m, d, out=d).mul_(sc)
                    add_stochastic_(r, d, self._round_gen)
            if self._score_views is not None:
                score = [self._score_views[index[id(p)]] for p in ps]
                sdt = self._score.dtype  # the EMA in the state dtype (fp32 EMA of bf16 grads too)
                g32 = [g if g.dtype == sdt else g.to(sdt) for g in grads]
                if importance == "ema_grad":
                    torch._foreach_mul_(score, beta_ema)
                    torch._foreach_add_(score, torch._foreach_abs(g32), alpha=1 - beta_ema)
                else:  # impact: signed EMA, so noise averages out
                    torch._foreach_lerp_(score, g32, 1 - beta_ema)

    def _record_decay(self, param_indices: list[int], factor: float) -> None:
        """Note `W *= factor` on these parameters as flat ranges (adjacent ones merged: the same multiply)."""
        for i in param_indices:
            start, stop = self.layout.offsets[i], self.layout.offsets[i] + self._params[i].numel()
            last = self.decay_ops[-1] if self.decay_ops else None
            if last is not None and last[1] == start and last[2] == factor:
                self.decay_ops[-1] = (last[0], stop, factor)
            else:
                self.decay_ops.append((start, stop, factor))

    def current_density(self) -> float:
        """This exchange's density: 1 in warm-up; adaptive if configured (agreed across ranks)."""
        o = self.options
        if self.steps <= o["warmup_steps"]:
            return 1.0
        if o["adaptive_epsilon"] is None:
            return o["density"]
        flat = self.ef.residuals["flat"]
        m = min(flat.numel(), 65536)
        sample = flat[torch.randint(flat.numel(), (m,), generator=self._sample_gen).to(flat.device)].float().abs()
        mass = torch.sort(sample, descending=True).values.cumsum(0)
        need = (1 - o["adaptive_epsilon"]) * float(mass[-1]) if m else 0.0
        frac = (int(torch.searchsorted(mass, torch.tensor([need], device=mass.device))[0]) + 1) / max(m, 1)
        density = min(max(frac, o["min_density"]), o["max_density"])
        if self.transport.world_size == 1:  # one worker, or the coordinator (which accepts any k per worker)
            return density
        agreed = torch.tensor([density], dtype=torch.float64, device=getattr(self.transport, "device", "cpu"))
        self.transport.all_reduce_mean_(agreed)  # collective peers must choose the same k and path
        return float(agreed)

    def _tensor_densities(self, density: float) -> list[float]:
        """Each tensor's density this exchange: its group's, if set (warm-up excepted), else `density`."""
        if self.steps <= self.options["warmup_steps"]:
            return [1.0] * len(self._params)
        return [density if gd is None else gd for gd in self._group_density]

    def _exchange(self) -> None:
        density = self.current_density()
        per_tensor = self._tensor_densities(density)
        if self.options["budget"] == "per_tensor":
            k = sum(k_for(p.numel(), d) for p, d in zip(self._params, per_tensor))
        else:
            k = k_for(self.numel, density)
        flat = self.ef.residuals["flat"]
        for d in getattr(self.transport, "take_delivered", list)():  # a restart's pushes the coordinator
            subtract_sent_(flat, d)                                   # already counted leave, as sent
        if hasattr(self.transport, "set_decay"):
            self.transport.set_decay(tuple(self.decay_ops))
        self.exchange.exchange("flat", flat, k, self.layout, select=lambda sel: self._select(sel, k, per_tensor))
        self.decay_ops.clear()  # carried by this exchange
        self.version += 1

    def _select(self, selector, k: int, per_tensor: list[float]) -> SparseDelta:
        flat = self.ef.residuals["flat"]
        if self.options["budget"] == "global":
            return selector.select(flat, k, self._ranking(flat, self._score))
        parts_i, parts_v = [], []
        for p, off, pd in zip(self._params, self.layout.offsets, per_tensor):
            view = flat[off:off + p.numel()]
            score = self._ranking(view, None if self._score is None else self._score[off:off + p.numel()], own_buffer=True)
            d = selector.select(view, k_for(p.numel(), pd), score)
            parts_i.append(d.indices + off)
            parts_v.append(d.values)
        return SparseDelta(torch.cat(parts_i), torch.cat(parts_v), (self.numel,), flat.dtype)

    def _ranking(self, residual: torch.Tensor, score: torch.Tensor | None, own_buffer: bool = False) -> torch.Tensor | None:
        """What top-k ranks by: |residual| (None), the EMA of |grad|, or the first-order loss change
        |residual * EMA(grad)| that sending the residual would bring ("impact")."""
        if self.options["importance"] != "impact":
            return score
        if own_buffer:
            return (residual * score).abs_()
        if self._rank_buf is None or self._rank_buf.shape != residual.shape:
            self._rank_buf = torch.empty_like(residual)
        return torch.mul(residual, score, out=self._rank_buf).abs_()
