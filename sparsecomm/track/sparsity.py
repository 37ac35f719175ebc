"""Update-sparsity tracker: how many weights did the last step change, under which definition.

Two lines in any PyTorch loop:

    tracker = SparsityTracker(model)              # after building the model
    metrics = tracker.step(lr=scheduler_lr)       # after optimizer.step(); returns a dict

Definitions (every number is reported with its definition in the key, never one unlabelled
"sparsity"). Sparsity = fraction of entries NOT changed, in [0, 1]:

    fp32_exact     w_new != w_old in the parameter's own (master) precision
    bf16_view      bf16(w_new) != bf16(w_old): what a bf16 copy (rollout worker, bf16 checkpoint)
                   sees. Adam moves a weight by ~lr, often below half a bf16 ULP (|w|/256), so
                   this view is much sparser than fp32: the "98-99% unchanged" figure is mostly
                   this rounding effect (PULSE arXiv 2602.03839; Mukherjee et al. 2505.11711).
    rel_threshold  |w_new - w_old| > rel_tau * |w_new|          (default rel_tau = 1e-3)
    abs_threshold  |w_new - w_old| > abs_tau   (the research plan's definition; default 0, which
                   equals fp32_exact up to signed zeros)

Plus |delta| max/mean/std, lr / median |w| (median from a fixed random sample of weights,
refreshed every `median_every` measured steps), and accumulated sparsity between weights K
steps apart for each K in `k_steps`. `every=N` measures every N-th step (exactly, against the
weights of the step before, snapshotted then) for 1/N of the cost.

Snapshot modes and their memory cost (P = number of tracked weights):

    mode   snapshot                     extra memory                 definitions available
    fp32   fp32 clone, param device     4 B x P (+4 B x P per K)     all four (the plan's method)
    cpu    fp32 clone in host memory    4 B x P host (+ per K); a    all four
                                        device->host copy per step
    bf16   bf16 copy, param device      2 B x P (+2 B x P per K)     bf16_view only (cheapest; the
                                                                     always-on mode)
    (+2 B x P when the hot-parameter map is on; + a transient 4 B x largest-parameter temporary)
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn

from .hot import HotParameterMap
from .layers import named_parameter_kinds

DEFINITIONS = ("fp32_exact", "bf16_view", "rel_threshold", "abs_threshold")
MODES = {"fp32": DEFINITIONS, "cpu": DEFINITIONS, "bf16": ("bf16_view",)}


class SparsityTracker:
    def __init__(self, model: nn.Module, mode: str = "fp32", rel_tau: float = 1e-3, abs_tau: float = 0.0,
                 k_steps: Iterable[int] = (10,), per_param: bool = True, hot_window: int = 0,
                 hot_definition: str | None = None, median_sample: int = 65536, seed: int = 0, every: int = 1,
                 median_every: int = 10):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        if rel_tau < 0 or abs_tau < 0:
            raise ValueError("rel_tau and abs_tau must be >= 0")
        self.k_steps = tuple(sorted(set(int(k) for k in k_steps)))
        if any(k < 2 for k in self.k_steps):
            raise ValueError(f"k_steps must be >= 2 (k=1 is the per-step sparsity), got {self.k_steps}")
        if every < 1 or median_every < 1:
            raise ValueError("every and median_every must be >= 1")
        if every > 1 and (hot_window or any(k % every for k in self.k_steps)):
            raise ValueError("with every > 1 the hot map needs every step (hot_window=0) and k_steps must be multiples of every")
        self.every, self.median_every, self._median = every, median_every, None
        self.mode, self.rel_tau, self.abs_tau, self.per_param = mode, rel_tau, abs_tau, per_param
        self.definitions = MODES[mode]
        self.hot_definition = hot_definition or self.definitions[0]
        if self.hot_definition not in self.definitions:
            raise ValueError(f"hot_definition {self.hot_definition!r} is not available in mode {mode!r}")
        self.kinds = named_parameter_kinds(model)
        self.params = {n: p for n, p in model.named_parameters() if n in self.kinds}
        self.numel = sum(p.numel() for p in self.params.values())
        self.snap = {n: self._snapshot(p) for n, p in self.params.items()}
        self.snap_k = {k: {n: self._snapshot(p) for n, p in self.params.items()} for k in self.k_steps}
        self.hot = HotParameterMap(hot_window, self.kinds) if hot_window else None
        self.steps = 0
        # fixed sample positions for the median |w| (cheap; exact median would sort every weight)
        g = torch.Generator().manual_seed(seed)
        share = {n: max(1, round(median_sample * p.numel() / max(self.numel, 1))) for n, p in self.params.items()}
        self.sample_idx = {n: torch.randint(p.numel(), (min(share[n], p.numel()),), generator=g).to(p.device)
                           for n, p in self.params.items()}

    def _snapshot(self, p: torch.Tensor) -> torch.Tensor:
        w = p.detach()
        if self.mode == "bf16":
            return w.to(torch.bfloat16, copy=True)
        if self.mode == "cpu":
            return w.to("cpu", copy=True)
        return w.clone()

    @property
    def snapshot_bytes(self) -> int:
        """Memory the snapshots hold right now (excluding the hot map)."""
        return sum(t.numel() * t.element_size() for snaps in [self.snap, *self.snap_k.values()] for t in snaps.values())

    def _changed(self, new: torch.Tensor, old: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-definition boolean masks of changed entries, plus |delta| (fp32) if available."""
        if self.mode == "bf16":
            nb = new.to(torch.bfloat16)
            return {"bf16_view": nb != old, "_next_snapshot": nb}  # swapped in: saves a second conversion
        absd = (new.float() - old.float()).abs_()
        return {"fp32_exact": absd > 0,
                "bf16_view": new.to(torch.bfloat16) != old.to(torch.bfloat16),
                "rel_threshold": absd > self.rel_tau * new.float().abs(),
                "abs_threshold": absd > self.abs_tau,
                "_absd": absd}

    @torch.no_grad()
    def _refresh(self) -> None:
        for name, p in self.params.items():
            self.snap[name].copy_(p.detach())

    @torch.no_grad()
    def step(self, lr: float | None = None) -> dict[str, float]:
        """Compare the weights with the snapshot, update it, return this step's metrics.

        With every = N > 1 only every N-th step is measured (exactly: against the weights one step
        earlier, snapshotted at the step before); other calls return {} and cost nothing, or one copy.
        """
        self.steps += 1
        if self.every > 1:
            if self.steps % self.every == self.every - 1:
                self._refresh()  # arm: the next step is measured against these weights
                return {}
            if self.steps % self.every:
                return {}
        counts = {d: [] for d in self.definitions}
        absd_sum, absd_sq, absd_max = [], [], []
        names = list(self.params)
        for name in names:
            new = self.params[name].detach()
            if self.mode == "cpu":
                new = new.to("cpu")
            ch = self._changed(new, self.snap[name])
            for d in self.definitions:
                counts[d].append(torch.count_nonzero(ch[d]))
            if "_absd" in ch:
                a = ch["_absd"]
                absd_sum.append(a.double().sum())
                absd_sq.append(a.double().square().sum())
                absd_max.append(a.max() if a.numel() else a.new_zeros(()))
            if self.hot is not None:
                self.hot.observe(name, ch[self.hot_definition])
            if "_next_snapshot" in ch:
                self.snap[name] = ch["_next_snapshot"]
            else:
                self.snap[name].copy_(new)
        out: dict[str, float] = {}
        sizes = [self.params[n].numel() for n in names]
        for d in self.definitions:
            c = torch.stack(counts[d]).tolist() if names else []
            self._aggregate(out, f"sparsity/{d}", names, c, sizes)
        if absd_sum:
            s, sq, n = float(torch.stack(absd_sum).sum()), float(torch.stack(absd_sq).sum()), max(self.numel, 1)
            mean = s / n
            out["update/max_abs"] = float(torch.stack([m.float().cpu() for m in absd_max]).max())
            out["update/mean_abs"] = mean
            out["update/std_abs"] = math.sqrt(max(sq / n - mean * mean, 0.0))
        if lr is not None:
            if self._median is None or (self.steps // self.every) % self.median_every == 0:
                # |w| moves slowly: a fixed sample, refreshed every median_every measured steps
                sample = torch.cat([self.params[n].detach().reshape(-1)[self.sample_idx[n]].float().cpu() for n in names])
                self._median = float(sample.abs().median()) if sample.numel() else float("nan")
            med = self._median
            out["update/median_abs_w"] = med
            out["update/lr_over_median_abs_w"] = lr / med if med > 0 else float("inf")
        for k in self.k_steps:
            if self.steps % k == 0:
                self._k_step(out, k, names, sizes)
        if self.hot is not None:
            out.update(self.hot.end_step(self.steps))
        return out

    def _k_step(self, out: dict, k: int, names: list[str], sizes: list[int]) -> None:
        defs = ("fp32_exact", "bf16_view") if self.mode != "bf16" else ("bf16_view",)
        counts = {d: [] for d in defs}
        for name in names:
            new = self.snap[name]  # just updated to the current weights
            old = self.snap_k[k][name]
            if self.mode == "bf16":
                counts["bf16_view"].append(torch.count_nonzero(new != old))
            else:
                counts["fp32_exact"].append(torch.count_nonzero(new != old))
                counts["bf16_view"].append(torch.count_nonzero(new.to(torch.bfloat16) != old.to(torch.bfloat16)))
            old.copy_(new)
        for d in defs:
            c = torch.stack(counts[d]).tolist()
            self._aggregate(out, f"sparsity_k{k}/{d}", names, c, sizes, per_param=False)

    def _aggregate(self, out: dict, prefix: str, names: list[str], changed: list[int], sizes: list[int],
                   per_param: bool | None = None) -> None:
        per_param = self.per_param if per_param is None else per_param
        total = sum(sizes)
        out[f"{prefix}/global"] = 1.0 - sum(changed) / total if total else 1.0
        by_kind: dict[str, list[int]] = {}
        for name, c, n in zip(names, changed, sizes):
            acc = by_kind.setdefault(self.kinds[name], [0, 0])
            acc[0] += c
            acc[1] += n
            if per_param:
                out[f"{prefix}/param/{name}"] = 1.0 - c / n if n else 1.0
        if prefix.startswith("sparsity/"):
            for kind, (c, n) in by_kind.items():
                out[f"{prefix}/kind/{kind}"] = 1.0 - c / n if n else 1.0
