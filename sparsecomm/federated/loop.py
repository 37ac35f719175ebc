"""The federated round loop in one process: the same client and server parts the Flower
strategy uses (client.py, server.py), with bytes and held-out accuracy per round. The benchmark
and the fast tests run it; the Flower transport (flower.py) carries the same payloads in
Flower messages between processes.

    run = FedRun(cfg, base_state)
    for rnd in range(1, cfg.rounds + 1):
        report = run.round(rnd, drop={3})        # client 3 drops out this round
    run.evaluate()                               # {"task/addition": acc, ..., "client/0": acc, ...}

`dense=True` is the baseline: classical FedAvg that moves whole fp32 models both ways and
averages models (x = sum_i w_i x_i / sum_i w_i); bytes counted as 4 bytes per parameter per copy.
"""
from __future__ import annotations

import random

from ..rl.tasks import datasets, make_task
from .client import LocalTrainer, State, Uplink, apply_downlinks, change, evaluate_state, from_wire, to_wire
from .config import FedConfig
from .server import FedServer, RoundReport
from .split import ClientData, split_clients

EVAL_SEED = 10**6


def sample_clients(cfg: FedConfig, rnd: int) -> list[int]:
    """Clients asked in round `rnd` (seed-fixed partial participation), sorted."""
    return sorted(random.Random(cfg.seed * 7919 + rnd).sample(range(cfg.clients), cfg.sampled_per_round()))


def heldout_sets(cfg: FedConfig, split: list[ClientData]) -> tuple[dict, dict]:
    """Held-out prompts: per task over all digits, and per client from its own distribution (different seeds
    from the training prompts)."""
    per_task = {t: datasets(make_task(t, **cfg.task_kwargs.get(t, {})), seed=EVAL_SEED + i, n_pretrain=0, n_sft=0,
                            n_rl=cfg.eval_size)["rl"] for i, t in enumerate(cfg.tasks)}
    per_client = {d.client: {t: d.examples(t, cfg.task_kwargs.get(t, {}), cfg.eval_size, EVAL_SEED + 97 * d.client + i)
                             for i, t in enumerate(d.tasks)} for d in split}
    return per_task, per_client


class ClientRuntime:
    """What a client keeps between rounds: its copy of the broadcast model, version, uplink EF."""

    def __init__(self, cfg: FedConfig, data: ClientData, base: State):
        self.trainer = LocalTrainer(cfg, data)
        self.layout, self.like = cfg.layout, base
        self.state = to_wire(base, cfg.layout)  # this client's copy of the broadcast model, wire layout
        self.version = 0
        self.uplink = Uplink(cfg.density_up, cfg.selector, cfg.value_codec_up)

    def round(self, rnd: int, downlinks: list[bytes]) -> tuple[bytes, float]:
        self.version = apply_downlinks(self.state, self.version, downlinks)
        new, metrics = self.trainer.train(from_wire(self.state, self.like, self.layout), rnd)
        delta = change(to_wire(new, self.layout), self.state)
        return self.uplink.encode(delta, rnd, self.version), metrics["num_examples"]


class FedRun:
    def __init__(self, cfg: FedConfig, base: State, dense: bool = False):
        self.cfg, self.dense = cfg, dense
        self.split = split_clients(cfg.clients, cfg.tasks, cfg.split, cfg.seed)
        self.base = base
        self.server = FedServer(cfg, to_wire(base, cfg.layout))
        self.clients = [ClientRuntime(cfg, d, base) for d in self.split]
        self.heldout_task, self.heldout_client = heldout_sets(cfg, self.split)

    def round(self, rnd: int, drop: frozenset[int] | set[int] = frozenset(),
              late: frozenset[int] | set[int] = frozenset()) -> RoundReport:
        """One round. Clients in `drop` are asked but fail before uploading (their state is unchanged); clients
        in `late` train and upload (their error feedback counts the upload as sent) but miss the deadline, so the
        server never sees it: what Flower's deadline does to a straggler."""
        asked = sample_clients(self.cfg, rnd)
        rep = RoundReport(rnd, dense_bytes_per_client=self.server.dense_bytes)
        if self.dense:
            return self._dense_round(rnd, asked, drop, rep)
        uploads = []
        for c in asked:
            down = self.server.downlink_for(self.clients[c].version)
            rep.bytes_down += sum(len(m) for m in down)
            if c in drop:
                rep.missing.append(c)
                continue
            payload, weight = self.clients[c].round(rnd, down)
            if c in late:
                rep.missing.append(c)
                continue
            rep.bytes_up += len(payload)
            up, reason = self.server.accept(c, payload, rnd, weight)
            if up is None:
                rep.refused[c] = reason
            else:
                uploads.append(up)
                rep.accepted.append(c)
        rep.applied = self.server.finish_round(rnd, uploads)
        return rep

    def _dense_round(self, rnd, asked, drop, rep: RoundReport) -> RoundReport:
        master = self.server.master
        models, weights = [], []
        for c in asked:
            rep.bytes_down += self.server.dense_bytes
            if c in drop:
                rep.missing.append(c)
                continue
            new, metrics = self.clients[c].trainer.train(from_wire(master, self.base, self.cfg.layout), rnd)
            new = to_wire(new, self.cfg.layout)
            rep.bytes_up += self.server.dense_bytes
            models.append(new)
            weights.append(metrics["num_examples"])
            rep.accepted.append(c)
        if len(models) >= self.cfg.quorum:
            total = sum(weights)
            for n in master:
                master[n] = sum(w / total * m[n] for w, m in zip(weights, models))
            self.server.broadcast = master
            rep.applied = True
        return rep

    def global_state(self) -> State:
        """The model the clients hold (the broadcast copy), by parameter name."""
        return from_wire(self.server.broadcast, self.base, self.cfg.layout)

    def evaluate(self) -> dict[str, float]:
        """Held-out greedy accuracy of the broadcast model: per task (all digits) and per client (its split)."""
        ev = self.clients[0].trainer
        state = self.global_state()
        out = {f"task/{t}": a for t, a in evaluate_state(ev, state, self.heldout_task).items()}
        for c, sets in self.heldout_client.items():
            accs = evaluate_state(ev, state, sets)
            out[f"client/{c}"] = sum(accs.values()) / len(accs)
        out["global"] = sum(out[f"task/{t}"] for t in self.cfg.tasks) / len(self.cfg.tasks)
        return out
