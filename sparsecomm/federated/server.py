"""Server side of federated RL: check uploads, aggregate, step, and re-sparsify the broadcast.

    server = FedServer(cfg, to_wire(base_state, cfg.layout))
    msgs = server.downlink_for(client_version)       # the downlink messages that client lacks
    ok, reason = server.accept(payload, rnd)         # decode + validate one upload, or a reason
    server.finish_round(rnd, accepted)               # aggregate (quorum!), step, new downlink

Aggregators (one registry): FedAvg (McMahan et al., arXiv 1602.05629) applies server_lr x the
weighted mean change; FedProx (arXiv 1812.06127) is FedAvg on the server with mu on the clients;
FedAdam (Reddi et al., arXiv 2003.00295) treats the mean change as a pseudo-gradient for a server
Adam (m, v, tau; no bias correction, as in the paper).

Downlink: the server keeps its fp32 model (`master`) and what the clients hold (`broadcast`). The
server's step goes into a downlink residual; `topk` sends its top-k at density_down (server-side
error feedback: the rest stays in the residual and goes out later), `dense` sends all of it.
At density 1.0 (or dense) the broadcast is the master, bit for bit. Each round's downlink is one
SPCD message (base = old version, step = new version); a client that missed rounds gets every
message it lacks, in order.

Uploads are refused, with a reason, when the bytes do not decode (truncated, corrupted: the
codec's CRCs and bounds), when the round or base version is not this round's, when the tensor
names, shapes or dtypes differ from the model's, or when a tensor carries more entries than
the uplink budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..codec import CodecError, decode_model, encode_model, roundtrip_values
from ..compress import ErrorFeedback, k_for, make_selector
from ..delta import SparseDelta
from .config import FedConfig

State = dict[str, torch.Tensor]


@dataclass
class Upload:
    client: int
    deltas: dict[str, SparseDelta]
    weight: float  # FedAvg weight (examples the client trained on)
    bytes_up: int


class MeanStep:
    """FedAvg / FedProx server step: server_lr x the mean change."""

    def __init__(self, cfg: FedConfig):
        self.lr = cfg.server_lr

    def step(self, mean: State) -> State:
        return mean if self.lr == 1.0 else {n: self.lr * d for n, d in mean.items()}


class FedAdam:
    """Server Adam on the mean change (the pseudo-gradient points downhill already: x += eta m / (sqrt v + tau))."""

    def __init__(self, cfg: FedConfig):
        self.lr, (self.b1, self.b2), self.tau = cfg.server_lr, cfg.fedadam_betas, cfg.fedadam_tau
        self.m: State = {}
        self.v: State = {}

    def step(self, mean: State) -> State:
        out = {}
        for n, d in mean.items():
            m = self.m.setdefault(n, torch.zeros_like(d)).mul_(self.b1).add_(d, alpha=1 - self.b1)
            v = self.v.setdefault(n, torch.zeros_like(d)).mul_(self.b2).addcmul_(d, d, value=1 - self.b2)
            out[n] = self.lr * m / (v.sqrt() + self.tau)
        return out


AGGREGATORS = {"fedavg": MeanStep, "fedprox": MeanStep, "fedadam": FedAdam}


def weighted_mean(uploads: list[Upload], like: State) -> State:
    """sum_i w_i d_i / sum_i w_i, accumulated in client order (deterministic)."""
    total = sum(u.weight for u in uploads)
    out = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in like.items()}
    for u in sorted(uploads, key=lambda u: u.client):
        for n, d in u.deltas.items():
            d.add_to(out[n], alpha=u.weight / total)
    return out


@dataclass
class RoundReport:
    round: int
    accepted: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)
    applied: bool = False
    bytes_up: int = 0
    bytes_down: int = 0
    dense_bytes_per_client: int = 0


class FedServer:
    def __init__(self, cfg: FedConfig, base: State):
        self.cfg = cfg
        self.master = {n: t.detach().to(torch.float32).clone() for n, t in base.items()}
        self.broadcast = {n: t.clone() for n, t in self.master.items()}
        self.down_ef = ErrorFeedback()  # the part of the server's steps not broadcast yet
        self.aggregator = AGGREGATORS[cfg.aggregator](cfg)
        self.selector = make_selector(cfg.selector)
        self.version = 0
        self.history: list[bytes] = []  # history[v] leads from version v to v + 1
        self.dense_bytes = sum(t.numel() * 4 for t in self.master.values())  # one fp32 copy of the model
        self.k_up = {n: k_for(t.numel(), cfg.density_up) for n, t in self.master.items()}
        # sampled selectors may return a few more than k (SELECTORS' tolerance); refuse only clear overruns
        self.k_up_limit = {n: k if cfg.selector in ("topk", "randomk", "chunked") else math.ceil(1.25 * k) + 1
                           for n, k in self.k_up.items()}

    def downlink_for(self, client_version: int) -> list[bytes]:
        if not 0 <= client_version <= self.version:
            raise ValueError(f"client version {client_version} outside [0, {self.version}]")
        return self.history[client_version:]

    def accept(self, client: int, payload: bytes, rnd: int, weight: float) -> tuple[Upload | None, str]:
        """Decode and validate one upload: (Upload, "") or (None, reason)."""
        try:
            deltas = decode_model(payload)
        except CodecError as e:
            return None, f"malformed payload: {e}"
        if set(deltas) != set(self.master):
            missing, extra = sorted(set(self.master) - set(deltas)), sorted(set(deltas) - set(self.master))
            return None, f"tensor names differ from the model's (missing {missing[:3]}, unknown {extra[:3]})"
        for name, d in deltas.items():
            ref = self.master[name]
            if d.shape != tuple(ref.shape):
                return None, f"tensor {name!r}: shape {d.shape} != model shape {tuple(ref.shape)}"
            if d.dtype != torch.float32:
                return None, f"tensor {name!r}: dtype {d.dtype} (uploads must decode to float32)"
            if d.step != rnd:
                return None, f"round {d.step} in the payload, but this is round {rnd}"
            if d.base_version != self.version:
                return None, f"computed against version {d.base_version}, the server is at {self.version} (stale)"
            if d.k > self.k_up_limit[name]:
                return None, f"tensor {name!r}: {d.k} entries exceed the uplink budget k={self.k_up[name]}"
        if not (weight > 0 and math.isfinite(weight)):
            return None, f"weight {weight!r} is not a positive finite number"
        return Upload(client, deltas, float(weight), len(payload)), ""

    def finish_round(self, rnd: int, uploads: list[Upload]) -> bool:
        """Aggregate and step if at least `quorum` uploads were accepted; publish the next downlink."""
        if len(uploads) < self.cfg.quorum:
            return False
        step = self.aggregator.step(weighted_mean(uploads, self.master))
        sent = {}
        for n, s in step.items():
            self.master[n].add_(s)
            r = self.down_ef.compensate(n, s)                    # residual += step (server-side error feedback)
            if self.cfg.downlink == "dense" or self.cfg.density_down >= 1.0:
                d = SparseDelta(torch.arange(r.numel()), r.reshape(-1).clone(), tuple(r.shape))
            else:
                d = self.selector.select(r, k_for(r.numel(), self.cfg.density_down))
            d = roundtrip_values(d, self.cfg.value_codec_down)  # exactly what the clients will decode
            self.down_ef.update(n, d)                            # what was sent leaves the residual
            d.add_to(self.broadcast[n])
            sent[n] = d
        self.history.append(encode_model(sent, value=self.cfg.value_codec_down, step=self.version + 1, base_version=self.version))
        self.version += 1
        return True
