"""Rank of gradients and updates, measured correctly, next to the plan's stacked method.

Per matrix G (m x n), from its singular values s:

    stable rank   ||G||_F^2 / ||G||_2^2 = sum s^2 / max s^2         (robust, <= true rank)
    entropy rank  exp(H(p)), p_i = s_i / sum s   (Roy & Vetterli's effective rank)

each reported against three references: min(m, n); the token-count bound (the gradient of a
linear layer is a sum of one outer product per token, so rank <= tokens in the batch); and the
same measure for a same-shape i.i.d. Gaussian matrix (what "full rank" looks like under this
measure: e.g. the stable rank of a random m x n matrix is far below min(m, n)).

The research plan's method - SVD of k stacked, flattened gradients - is `stacked_rank`. Its
result can never exceed k (the number of stacked batches), whatever the gradients are; it is
labelled so in every output (`rank/stacked_bound_k`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import named_parameter_kinds


def _singular_values(g: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(g.detach().float())


def stable_rank(g: torch.Tensor) -> float:
    s = _singular_values(g)
    return float((s.square().sum() / s[0].square()).item()) if s.numel() and s[0] > 0 else 0.0


def entropy_rank(g: torch.Tensor) -> float:
    s = _singular_values(g)
    total = s.sum()
    if not s.numel() or total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()).item())


_RANDOM_CACHE: dict[tuple[int, int], tuple[float, float]] = {}


def random_baseline(shape: tuple[int, int], seed: int = 0) -> tuple[float, float]:
    """(stable rank, entropy rank) of a same-shape i.i.d. Gaussian matrix (cached per shape)."""
    if shape not in _RANDOM_CACHE:
        g = torch.Generator().manual_seed(seed)
        r = torch.randn(shape, generator=g)
        _RANDOM_CACHE[shape] = (stable_rank(r), entropy_rank(r))
    return _RANDOM_CACHE[shape]


def stacked_rank(flat_grads: list[torch.Tensor], energy: float = 0.99) -> dict[str, float]:
    """The plan's method: SVD of k stacked flattened gradients. Bounded by k by construction."""
    k = len(flat_grads)
    if k == 0:
        return {}
    s = torch.linalg.svdvals(torch.stack([g.detach().float().reshape(-1) for g in flat_grads]))
    e = s.square().cumsum(0) / s.square().sum().clamp_min(1e-30)
    return {"rank/stacked/energy99": int((e < energy).sum().item()) + 1, "rank/stacked/entropy": entropy_rank_from_s(s),
            "rank/stacked_bound_k": k}


def entropy_rank_from_s(s: torch.Tensor) -> float:
    p = s / s.sum().clamp_min(1e-30)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()).item()) if p.numel() else 0.0


class RankTracker:
    """Per-matrix rank of gradients (call before zero_grad) and of updates accumulated over a window.

        rank = RankTracker(model, every=50)
        ...loss.backward(); metrics = rank.observe_gradients(step, tokens=batch_tokens); opt.step()
    """

    def __init__(self, model: nn.Module, every: int = 50, max_dim: int = 4096, update_window: int = 0):
        self.every, self.max_dim, self.update_window = every, max_dim, update_window
        kinds = named_parameter_kinds(model)
        self.params = {n: p for n, p in model.named_parameters()
                       if n in kinds and p.dim() == 2 and max(p.shape) <= max_dim}
        self.kinds = {n: kinds[n] for n in self.params}
        self.start = {n: p.detach().clone() for n, p in self.params.items()} if update_window else {}
        self.steps = 0

    def _measure(self, prefix: str, tensors: dict[str, torch.Tensor], tokens: int | None) -> dict[str, float]:
        out = {}
        for n, g in tensors.items():
            m, k = g.shape
            sr, er = stable_rank(g), entropy_rank(g)
            rsr, rer = random_baseline((m, k))
            out[f"{prefix}/stable/{n}"] = sr
            out[f"{prefix}/entropy/{n}"] = er
            out[f"{prefix}/random_stable/{n}"] = rsr
            out[f"{prefix}/random_entropy/{n}"] = rer
            out[f"{prefix}/bound_min_mn/{n}"] = min(m, k)
            if tokens is not None:
                out[f"{prefix}/bound_tokens/{n}"] = min(m, k, tokens)
        return out

    @torch.no_grad()
    def observe_gradients(self, step: int, tokens: int | None = None) -> dict[str, float]:
        if not self.every or step % self.every:
            return {}
        grads = {n: p.grad for n, p in self.params.items() if p.grad is not None}
        return self._measure("rank/grad", grads, tokens)

    @torch.no_grad()
    def observe_update(self) -> dict[str, float]:
        """Call after optimizer.step(); every `update_window` steps, rank of w_now - w_window_start."""
        if not self.update_window:
            return {}
        self.steps += 1
        if self.steps % self.update_window:
            return {}
        deltas = {n: p.detach() - self.start[n] for n, p in self.params.items()}
        for n, p in self.params.items():
            self.start[n].copy_(p.detach())
        out = self._measure("rank/update", deltas, None)
        out["rank/update_window_steps"] = self.update_window
        return out


