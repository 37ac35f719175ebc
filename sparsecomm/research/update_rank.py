"""Whole-run update rank: the rank of W_end - W_start per matrix, the question the literature asks
(issue 18), next to the per-step gradient rank that sparsecomm.track.rank measures.

Per 2-D parameter, from the update D = W_end - W_start over the whole run (fp32):

    stable rank     ||D||_F^2 / ||D||_2^2        entropy rank    exp(H(s / sum s))
    numerical rank  singular values above torch.linalg.matrix_rank's default tolerance
    bounds          min(m, n); the token bound min(m, n, tokens) (see below)
    random          the same measures of a same-shape Gaussian matrix scaled to ||D||_F
                    (what an unstructured update of that size looks like under each measure)
    changed         fraction of entries changed over the run, fp32 exact and in the bf16 view

The token bound: a linear layer's gradient is a sum of one outer product per token, so one step's
gradient has rank <= the tokens in its batch, and a run of plain SGD (momentum included: it is
linear in the gradients) moves W by a matrix of rank <= all tokens seen. Adam's elementwise
normalisation and weight decay break that bound, so a whole-run rank above it is a statement
about the optimizer, not an error; `tokens` is recorded so the reader can tell.

    tracker = WholeRunRank(model)                 # snapshots W_start
    for step ...: ...; tracker.observe_tokens(batch_tokens)
    metrics = tracker.finish()                    # {"rank/whole_run/stable/<name>": ..., ...}

or `whole_run_rank(w_start, w_end, tokens)` on two state dicts. Test:
tests/unit/research/test_update_rank.py (a known low-rank update comes out at its rank).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..track.rank import entropy_rank, stable_rank

PREFIX = "rank/whole_run"


def _random_like(shape: tuple[int, int], fro: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(shape, generator=g)
    return r * (fro / r.norm()) if fro > 0 else r


def whole_run_rank(w_start: dict[str, torch.Tensor], w_end: dict[str, torch.Tensor], tokens: int | None = None,
                   max_dim: int = 4096, seed: int = 0) -> dict[str, float]:
    """Per 2-D matrix in both dicts (at most max_dim on a side: SVD cost), the rank measures of
    w_end - w_start listed in the module docstring; plus means over matrices of rank / min(m, n)."""
    out: dict[str, float] = {}
    ratios: dict[str, list[float]] = {"stable": [], "entropy": [], "random_stable": [], "random_entropy": []}
    changed = {"fp32_exact": [0, 0], "bf16_view": [0, 0]}
    for name, a in w_start.items():
        b = w_end.get(name)
        if b is None or a.dim() != 2 or a.shape != b.shape or max(a.shape) > max_dim:
            continue
        a32, b32 = a.detach().float(), b.detach().float()
        d = b32 - a32  # (m, n) fp32: the whole run's update
        m, n = d.shape
        fro = float(d.norm())
        rnd = _random_like((m, n), fro, seed)
        row = {"stable": stable_rank(d) if fro > 0 else 0.0, "entropy": entropy_rank(d) if fro > 0 else 0.0,
               "numerical": int(torch.linalg.matrix_rank(d)) if fro > 0 else 0,
               "random_stable": stable_rank(rnd), "random_entropy": entropy_rank(rnd),
               "random_fro": float(rnd.norm()) if fro > 0 else 0.0, "fro": fro, "bound_min_mn": min(m, n)}
        if tokens is not None:
            row["bound_tokens"] = min(m, n, int(tokens))
        ch32 = int((d != 0).sum())
        ch16 = int((b.detach().to(torch.bfloat16) != a.detach().to(torch.bfloat16)).sum())
        row["changed_fp32_exact"], row["changed_bf16_view"] = ch32 / d.numel(), ch16 / d.numel()
        for k, v in row.items():
            out[f"{PREFIX}/{k}/{name}"] = v
        for k in ratios:
            ratios[k].append(row[k] / min(m, n))
        changed["fp32_exact"][0] += ch32
        changed["bf16_view"][0] += ch16
        changed["fp32_exact"][1] += d.numel()
        changed["bf16_view"][1] += d.numel()
    for k, v in ratios.items():
        if v:
            out[f"{PREFIX}/mean_{k}_over_min_mn"] = sum(v) / len(v)
    for view, (c, total) in changed.items():
        if total:
            out[f"{PREFIX}/changed/{view}/global"] = c / total  # matrices only (the ones ranked)
    if tokens is not None:
        out[f"{PREFIX}/tokens"] = int(tokens)
    return out


class WholeRunRank:
    """Snapshot the model's 2-D parameters now; `finish()` measures the update since then.
    Counts tokens through observe_tokens() so the token bound is recorded with the ranks."""

    def __init__(self, model: nn.Module, max_dim: int = 4096):
        self.model, self.max_dim = model, max_dim
        self.start = {n: p.detach().float().clone() for n, p in model.named_parameters()
                      if p.dim() == 2 and max(p.shape) <= max_dim}
        self.tokens = 0

    def observe_tokens(self, n: int) -> None:
        self.tokens += int(n)

    @torch.no_grad()
    def finish(self) -> dict[str, float]:
        end = {n: p.detach() for n, p in self.model.named_parameters() if n in self.start}
        return whole_run_rank(self.start, end, self.tokens, self.max_dim)
