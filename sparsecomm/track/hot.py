"""Hot-parameter map: which weights change, how often, over a window of steps.

Per weight, a small integer counter incremented by the step's changed mask (a tensor add, no
Python loop over indices); memory 2 bytes per tracked weight. At the end of each window:
the fraction of weights that changed in more than half the window's steps (globally, per
layer kind, per parameter) and a downsampled heatmap per matrix (mean change frequency in
[0, 1] over blocks, at most `heatmap_side` x `heatmap_side`), kept for `save()`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class HotParameterMap:
    def __init__(self, window: int, kinds: dict[str, str], heatmap_side: int = 64):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window, self.kinds, self.side = window, kinds, heatmap_side
        self.counts: dict[str, torch.Tensor] = {}
        self.steps_seen = 0
        self.heatmaps: dict[int, dict[str, np.ndarray]] = {}  # window end step -> name -> heatmap

    def observe(self, name: str, changed: torch.Tensor) -> None:
        c = self.counts.get(name)
        if c is None:
            c = self.counts[name] = torch.zeros(changed.shape, dtype=torch.int16, device=changed.device)
        c.add_(changed.to(torch.int16))

    def end_step(self, step: int) -> dict[str, float]:
        """Call once per step after all `observe`s; returns metrics at a window's end, else {}."""
        self.steps_seen += 1
        if self.steps_seen < self.window:
            return {}
        out, tot, hot_by_kind, n_by_kind = {}, [0, 0], {}, {}
        maps = {}
        for name, c in self.counts.items():
            hot = int(torch.count_nonzero(c > self.window / 2))
            kind = self.kinds.get(name, "other")
            hot_by_kind[kind] = hot_by_kind.get(kind, 0) + hot
            n_by_kind[kind] = n_by_kind.get(kind, 0) + c.numel()
            tot[0] += hot
            tot[1] += c.numel()
            out[f"hot/frac_changed_gt_half/param/{name}"] = hot / max(c.numel(), 1)
            if c.dim() == 2:
                maps[name] = self._downsample(c.float() / self.window)
            c.zero_()
        out["hot/frac_changed_gt_half/global"] = tot[0] / max(tot[1], 1)
        for kind in hot_by_kind:
            out[f"hot/frac_changed_gt_half/kind/{kind}"] = hot_by_kind[kind] / max(n_by_kind[kind], 1)
        out["hot/window_steps"] = self.window
        self.heatmaps[step] = maps
        self.steps_seen = 0
        return out

    def _downsample(self, freq: torch.Tensor) -> np.ndarray:
        h, w = freq.shape
        out = F.adaptive_avg_pool2d(freq.cpu()[None, None], (min(h, self.side), min(w, self.side)))
        return out[0, 0].numpy()

    def save(self, path: str | Path) -> None:
        """All windows' heatmaps as one .npz: keys 'step<N>/<param name>'."""
        arrays = {f"step{s}/{name}": m for s, maps in self.heatmaps.items() for name, m in maps.items()}
        np.savez_compressed(path, **arrays)
