"""FedConfig: one federated RL run (clients, rounds, local GRPO, aggregation, compression, faults).

Every field is checked in `__post_init__`, so a bad value is one clear ValueError before any
client starts (on the server and on every client, which build the same config).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..codec import VALUE_CODECS
from ..compress import SELECTORS
from ..rl.losses import GRPOConfig
from ..rl.tasks import TASKS

AGGREGATORS = ("fedavg", "fedprox", "fedadam")
DOWNLINKS = ("topk", "dense")
LAYOUTS = ("flat", "per_tensor")
SPLITS = ("iid", "noniid")
LOCAL_OPTIMIZERS = ("adam", "sgd")


@dataclass
class FedConfig:
    clients: int = 8
    """Number of clients (Flower supernodes); client c owns partition c of the split."""
    rounds: int = 20
    """Federated rounds."""
    fraction: float = 1.0
    """Fraction of clients sampled per round (partial participation); at least `quorum` are sampled."""
    local_steps: int = 2
    """E: local GRPO steps per round on the client's own prompts."""
    local_optimizer: str = "adam"
    """adam | sgd; a fresh optimizer every round (state is not carried across rounds)."""
    local_lr: float = 1e-3
    """Client learning rate."""
    prompts_per_step: int = 4
    """Prompts per local GRPO step (each sampled group_size times)."""
    grpo: dict[str, Any] = field(default_factory=lambda: {"group_size": 8, "max_new_tokens": 4, "beta": 0.0})
    """GRPOConfig fields (beta=0: no reference model on the clients)."""
    aggregator: str = "fedavg"
    """fedavg | fedprox (FedAvg on the server, proximal term `mu` on the clients) | fedadam (server Adam)."""
    mu: float = 0.0
    """FedProx proximal weight: clients add mu/2 * ||w - w_global||^2 to their loss (needs aggregator=fedprox)."""
    server_lr: float = 1.0
    """Server step size: FedAvg/FedProx apply server_lr x the mean change; FedAdam's eta (try 1e-3..1e-2)."""
    fedadam_betas: tuple[float, float] = (0.9, 0.99)
    """FedAdam's (beta1, beta2)."""
    fedadam_tau: float = 1e-3
    """FedAdam's adaptivity tau (Reddi et al., arXiv 2003.00295)."""
    density_up: float = 0.01
    """Fraction of each tensor's entries a client uploads (top-k of its model change + error feedback)."""
    density_down: float = 0.01
    """Fraction of each tensor's entries the server broadcasts (downlink=topk), with server-side error feedback."""
    downlink: str = "topk"
    """topk: re-sparsify the server step at density_down; dense: the exact fp32 step, every entry."""
    selector: str = "topk"
    """Selector name (sparsecomm.compress.SELECTORS) for both directions."""
    value_codec_up: str = "fp32"
    """Value codec of uploads (bf16/fp16/int8 are lossy: error feedback keeps their rounding error)."""
    value_codec_down: str = "fp32"
    """Value codec of the downlink (lossy codecs: the server's residual keeps the rounding error)."""
    layout: str = "flat"
    """flat: the model travels as one tensor "model" (one global top-k budget, one header: ~1.6x fewer
    bytes than per_tensor at 1% on the tiny model); per_tensor: one budget and one header per parameter."""
    quorum: int = 1
    """Minimum accepted replies for a round to update the model; below it the round is skipped."""
    deadline_s: float = 600.0
    """Seconds the server waits for replies in a round; later replies (stragglers) are dropped."""
    startup_timeout_s: float = 120.0
    """Seconds the server waits for the clients' start-up handshake (imports, model build) before round 1."""
    split: str = "noniid"
    """iid: every client samples all tasks over all digits; noniid: one task and one digit range per client."""
    tasks: tuple[str, ...] = ("addition", "sort")
    """Tasks the clients are split over (sparsecomm.rl.tasks)."""
    task_kwargs: dict[str, dict] = field(default_factory=lambda: {"addition": {"digits": 1}, "sort": {"length": 3}})
    """Per-task constructor kwargs."""
    reward: str = "default"
    """Reward name (sparsecomm.rl.tasks.REWARDS)."""
    model: str = "tiny"
    """Built-in model config (tiny | small | medium); the base weights come from the server."""
    prompts_per_client: int = 400
    """RL prompts generated per client from its split."""
    eval_size: int = 64
    """Held-out prompts per task and per client for greedy exact-match accuracy."""
    seed: int = 0
    """Seeds the split, client sampling, prompts and generation."""

    def __post_init__(self):
        self.tasks = tuple(self.tasks)
        self.fedadam_betas = tuple(self.fedadam_betas)
        checks = [
            (self.clients >= 1, f"clients must be >= 1, got {self.clients}"),
            (self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}"),
            (0.0 < self.fraction <= 1.0, f"fraction must be in (0, 1], got {self.fraction}"),
            (self.local_steps >= 1, f"local_steps must be >= 1, got {self.local_steps}"),
            (self.local_optimizer in LOCAL_OPTIMIZERS, f"local_optimizer {self.local_optimizer!r} not in {LOCAL_OPTIMIZERS}"),
            (self.local_lr > 0 and self.server_lr > 0, "local_lr and server_lr must be > 0"),
            (self.aggregator in AGGREGATORS, f"aggregator {self.aggregator!r} not in {AGGREGATORS}"),
            (self.mu >= 0, f"mu must be >= 0, got {self.mu}"),
            (self.aggregator != "fedprox" or self.mu > 0, "aggregator=fedprox needs mu > 0 (mu=0 is plain fedavg)"),
            (self.aggregator == "fedprox" or self.mu == 0, f"mu={self.mu} is FedProx's term: set aggregator=fedprox"),
            (all(0 <= b < 1 for b in self.fedadam_betas) and len(self.fedadam_betas) == 2, "fedadam_betas must be two values in [0, 1)"),
            (self.fedadam_tau > 0, "fedadam_tau must be > 0"),
            (0 < self.density_up <= 1 and 0 < self.density_down <= 1, "density_up and density_down must be in (0, 1]"),
            (self.downlink in DOWNLINKS, f"downlink {self.downlink!r} not in {DOWNLINKS}"),
            (self.selector in SELECTORS, f"selector {self.selector!r} not in {sorted(SELECTORS)}"),
            (self.value_codec_up in VALUE_CODECS, f"value_codec_up {self.value_codec_up!r} not in {sorted(VALUE_CODECS)}"),
            (self.value_codec_down in VALUE_CODECS, f"value_codec_down {self.value_codec_down!r} not in {sorted(VALUE_CODECS)}"),
            (self.layout in LAYOUTS, f"layout {self.layout!r} not in {LAYOUTS}"),
            (1 <= self.quorum <= self.clients, f"quorum must be in [1, clients={self.clients}], got {self.quorum}"),
            (self.deadline_s > 0 and self.startup_timeout_s > 0, "deadline_s and startup_timeout_s must be > 0"),
            (self.split in SPLITS, f"split {self.split!r} not in {SPLITS}"),
            (len(self.tasks) >= 1 and all(t in TASKS for t in self.tasks), f"tasks {self.tasks} must name tasks in {sorted(TASKS)}"),
            (self.prompts_per_client >= self.prompts_per_step >= 1, "need prompts_per_client >= prompts_per_step >= 1"),
            (self.eval_size >= 1, "eval_size must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"FedConfig: {msg}")
        try:
            GRPOConfig(**self.grpo)
        except TypeError as e:
            raise ValueError(f"FedConfig.grpo: {e}") from None

    @property
    def grpo_config(self) -> GRPOConfig:
        return GRPOConfig(**self.grpo)

    def sampled_per_round(self) -> int:
        return min(self.clients, max(self.quorum, round(self.fraction * self.clients)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FedConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"FedConfig: unknown fields {unknown}")
        # JSON (Flower's ConfigRecord, the ZeroMQ welcome) turns tuples into lists: restore them
        tuples = {f.name for f in dataclasses.fields(cls) if isinstance(f.default, tuple)}
        return cls(**{k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in d.items()})
