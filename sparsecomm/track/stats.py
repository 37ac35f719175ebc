"""StepStats: the one record every tracker writes into and every sink reads.

A record is a step number, the worker's identity, a wall-clock stamp and a flat dict of
metrics with hierarchical keys that carry their unit or definition:

    train/loss, train/reward
    sparsity/<definition>/global            fraction of entries NOT changed this step, in [0, 1]
    sparsity/<definition>/kind/<layer_kind>   ... per layer kind (attention, mlp, norm, embedding, other)
    sparsity/<definition>/param/<name>        ... per parameter
    sparsity_k<K>/<definition>/global       ... between the weights K steps apart (accumulated)
    update/max_abs, update/mean_abs, update/std_abs     |w_new - w_old| in fp32
    update/lr_over_median_abs_w             lr / median |w| (the bf16 effect depends on it)
    hot/frac_changed_gt_half/<scope>        fraction of weights changed in > half the window's steps
    rank/<stable|entropy>/<param>, rank/bound_min_mn/<param>, ...
    comm/sent_bytes, comm/recv_bytes        encoded buffers actually sent/received, headers included
    comm/dense_equiv_bytes                  what a ring all-reduce of the same tensors sends per worker
    comm/k, comm/density, comm/path         path: "sparse" | "dense" | "local"
    timing/<phase>_s                        select, encode, transfer, decode, apply, exchange, step
    timing/dense_allreduce_s                a real all_reduce of the same tensors, same group, same run

Sparsity definitions (see sparsity.py): fp32_exact, bf16_view, rel_threshold, abs_threshold.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

Metric = float | int | str


@dataclass
class StepStats:
    step: int
    rank: int = 0
    world_size: int = 1
    run: str = ""
    wall_time_s: float = field(default_factory=time.time)
    metrics: dict[str, Metric] = field(default_factory=dict)

    def update(self, metrics: dict[str, Metric] | None = None, prefix: str = "", **kw: Metric) -> "StepStats":
        for k, v in {**(metrics or {}), **kw}.items():
            self.metrics[prefix + k] = v
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StepStats":
        return cls(**{k: d[k] for k in ("step", "rank", "world_size", "run", "wall_time_s", "metrics") if k in d})
