"""Flower transport for sparsecomm's federated RL: a Strategy and a client Mod that carry the
project's encoded sparse deltas (SPCD messages, sparsecomm.codec) in Flower messages.

    from sparsecomm.federated.flower import run_simulation
    result = run_simulation(FedConfig(clients=8, rounds=20), base_state)   # Flower's simulation (Ray)

Needs `pip install 'sparsecomm[federated]'` (flwr[simulation] 1.42, Message API). Pieces:

- `SparseDeltaStrategy(flwr.serverapp.strategy.Strategy)`: samples clients, sends each the
  downlink messages it lacks (ConfigRecord "sparsecomm.down": round, version, messages:
  list[bytes]; a node seen for the first time also gets the current model once as an ArrayRecord,
  counted as initial bytes), and aggregates the uploads through FedServer (validation with a
  reason per refused reply, quorum, FedAvg / FedProx / FedAdam, re-sparsified downlink). The
  round deadline is Strategy.start's `timeout`: Grid.send_and_receive returns what arrived by then.
- `sparse_delta_mod`: a client Mod. Incoming, it applies the downlinks to the node's stored copy
  of the model (Context.state), and hands the inner ClientApp a plain ArrayRecord "arrays" of the
  model, as any Flower FedAvg client expects. Outgoing, it replaces the reply's "arrays" by the
  top-k of (new - global) with error feedback (the residual lives in Context.state), encoded:
  ConfigRecord "sparsecomm.up" {payload: bytes, version, partition}. The node's state is saved
  only after a reply is built: a client that fails mid-round keeps its previous model and residual.
- `make_client_app()`: the inner ClientApp (local GRPO steps on the node's partition,
  `node_config["partition-id"]`), wrapped with the Mod; `make_server_app(cfg, base_state, sink)`.

A straggler past the deadline keeps running: its reply is ignored, but its node state (model copy,
residual) is written back when it finishes, so if its next message is processed before that, it
trains from its older state (still consistent: downlinks carry versions, and what it uploaded in
the lost reply is simply lost, as for a dropout after sending).

The FedConfig travels in every train message (ConfigRecord "sparsecomm.cfg", JSON), so the
client side needs no configuration besides its partition id. The same apps run under Flower's
deployment runtime: `server_app` and `client_app` below are the components of the Flower App in
deploy/flower/ (its pyproject.toml), started with `flower-superlink`, one
`flower-supernode --node-config "partition-id=N"` per client and `flwr run deploy/flower LINK
--run-config 'set="clients=4 rounds=5" out="fed.json"'` (deploy/flower/README.md;
tests/integration/test_federated.py runs exactly that on loopback).
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from .client import LocalTrainer, State, Uplink, apply_downlinks, change, from_wire, to_wire
from .config import FedConfig
from .server import FedServer, RoundReport
from .split import split_clients

DOWN, UP, CFG, FULL = "sparsecomm.down", "sparsecomm.up", "sparsecomm.cfg", "sparsecomm.full"
_STATE_MODEL, _STATE_EF, _STATE_META = "sparsecomm.model", "sparsecomm.ef", "sparsecomm.meta"


def _record_bytes(rec: ArrayRecord) -> int:
    return sum(len(a.data) for a in rec.values())


def _tensors(rec: ArrayRecord) -> State:
    return {k: v.clone() for k, v in rec.to_torch_state_dict().items()}


# ------------------------------------------------------------------------------------- server

class SparseDeltaStrategy(Strategy):
    """Sparse-delta federated rounds over a Flower Grid; one FedServer holds the model and the rules."""

    def __init__(self, cfg: FedConfig, base_wire: State):
        self.cfg = cfg
        self.server = FedServer(cfg, base_wire)
        self.node_version: dict[int, int] = {}  # last version each node confirmed (in its reply)
        self.asked: dict[int, list[int]] = {}
        self.reports: list[RoundReport] = []
        self.bytes_down_initial = 0
        self.round_s: dict[int, float] = {}
        self.node_partition: dict[int, int] = {}
        self._t0: dict[int, float] = {}

    def handshake(self, grid: Grid) -> dict[int, int]:
        """Wait (up to startup_timeout_s) until `clients` nodes have registered, then ask every node for its
        partition id before round 1, so that client start-up (registration, imports, model build) does not
        eat into round 1's deadline; returns {node_id: partition}. On a loaded machine Flower's nodes
        register one by one: round 1 once sampled the single node registered so far."""
        t_end = time.perf_counter() + self.cfg.startup_timeout_s
        while len(list(grid.get_node_ids())) < self.cfg.clients and time.perf_counter() < t_end:
            time.sleep(0.5)
        nodes = sorted(grid.get_node_ids())
        replies = grid.send_and_receive([Message(content=RecordDict(), message_type="query", dst_node_id=n) for n in nodes],
                                        timeout=self.cfg.startup_timeout_s)
        self.node_partition = {m.metadata.src_node_id: int(m.content.config_records["partition"]["id"])
                               for m in replies if not m.has_error()}
        return self.node_partition

    def summary(self) -> None:
        print(f"SparseDeltaStrategy: {self.cfg.aggregator}, up {self.cfg.density_up:g}, down "
              f"{self.cfg.downlink} {self.cfg.density_down:g}, quorum {self.cfg.quorum}, deadline {self.cfg.deadline_s:g} s")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        nodes = sorted(grid.get_node_ids())
        want = min(len(nodes), max(self.cfg.quorum, round(self.cfg.fraction * len(nodes))))
        asked = sorted(random.Random(self.cfg.seed * 7919 + server_round).sample(nodes, want))
        self.asked[server_round] = asked
        self._t0[server_round] = time.perf_counter()
        rep = RoundReport(server_round, dense_bytes_per_client=self.server.dense_bytes)
        self.reports.append(rep)
        cfg_json = json.dumps(self.cfg.to_dict())
        msgs = []
        for node in asked:
            known = node in self.node_version
            version = self.node_version.get(node, self.server.version)
            down = self.server.downlink_for(version) if known else []
            content = RecordDict({DOWN: ConfigRecord({"round": server_round, "version": version, "messages": down}),
                                  CFG: ConfigRecord({"json": cfg_json})})
            if not known:  # first contact: the model itself, once (a late joiner's catch-up)
                full = ArrayRecord(torch_state_dict=self.server.broadcast)
                content[FULL] = full
                self.bytes_down_initial += _record_bytes(full)
            rep.bytes_down += sum(len(m) for m in down)
            msgs.append(Message(content=content, message_type="train", dst_node_id=node))
        return msgs

    def aggregate_train(self, server_round: int, replies):
        rep = self.reports[-1]
        uploads, answered = [], set()
        for msg in replies:
            node = msg.metadata.src_node_id
            answered.add(node)
            if msg.has_error():
                rep.refused[node] = f"client error: {msg.error.reason}"
                self.node_version.pop(node, None)  # it may have lost its state: send it the model next time
                continue
            up = msg.content.config_records.get(UP) if msg.has_content() else None
            if up is None or not isinstance(up.get("payload"), bytes):
                rep.refused[node] = f"reply has no {UP!r} ConfigRecord with a bytes payload"
                continue
            rep.bytes_up += len(up["payload"])
            weight = msg.content.metric_records.get("metrics", MetricRecord()).get("num-examples", 0)
            # the partition id orders the weighted sum, so the result does not depend on Flower's random node ids
            accepted, reason = self.server.accept(int(up.get("partition", node)), up["payload"], server_round, weight)
            if accepted is None:
                rep.refused[node] = reason
                continue
            self.node_version[node] = self.server.version  # it applied every downlink up to now
            uploads.append(accepted)
            rep.accepted.append(accepted.client)  # by partition id
        rep.missing = [n for n in self.asked[server_round] if n not in answered]
        rep.applied = self.server.finish_round(server_round, uploads)
        self.round_s[server_round] = time.perf_counter() - self._t0[server_round]
        metrics = MetricRecord({"accepted": len(rep.accepted), "refused": len(rep.refused), "missing": len(rep.missing),
                                "bytes-up": rep.bytes_up, "bytes-down": rep.bytes_down, "applied": int(rep.applied)})
        return ArrayRecord(torch_state_dict=self.server.broadcast), metrics

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []  # held-out evaluation runs on the server (evaluate_fn), not on the clients

    def aggregate_evaluate(self, server_round, replies):
        return None


def serve(grid: Grid, cfg: FedConfig, base: State, sink: dict, evaluate_fn=None) -> None:
    """Run `cfg.rounds` rounds on `grid` (the body of both ServerApps); the strategy and Flower's Result land in `sink`."""
    strategy = SparseDeltaStrategy(cfg, to_wire(base, cfg.layout))
    sink["strategy"] = strategy
    strategy.handshake(grid)
    ev = None
    if evaluate_fn is not None:
        def ev(rnd, arrays):
            return MetricRecord(evaluate_fn(from_wire(_tensors(arrays), base, cfg.layout)))
    sink["result"] = strategy.start(grid=grid, initial_arrays=ArrayRecord(torch_state_dict=strategy.server.broadcast),
                                    num_rounds=cfg.rounds, timeout=cfg.deadline_s, evaluate_fn=ev)


def make_server_app(cfg: FedConfig, base: State, sink: dict, evaluate_fn=None) -> ServerApp:
    """A ServerApp running `cfg.rounds` rounds (for the simulation, which takes the app object)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, cfg, base, sink, evaluate_fn)
    return app


# ------------------------------------------------------------------------------------- client

def sparse_delta_mod(msg: Message, context: Context, call_next) -> Message:
    """Client Mod: sparse downlink in, plain ArrayRecord to the app, top-k + EF of its change out."""
    if msg.metadata.message_type != "train" or DOWN not in msg.content.config_records:
        return call_next(msg, context)
    cfg = FedConfig.from_dict(json.loads(msg.content.config_records[CFG]["json"]))
    down = msg.content.config_records[DOWN]
    if FULL in msg.content.array_records:  # first contact: the server's model at `version`
        state, version = _tensors(msg.content.array_records[FULL]), int(down["version"])
    elif _STATE_MODEL in context.state.array_records:
        state = _tensors(context.state.array_records[_STATE_MODEL])
        version = int(context.state.config_records[_STATE_META]["version"])
    else:
        raise RuntimeError("the server sent no model and this node holds none (its state was lost): cannot train")
    version = apply_downlinks(state, version, list(down["messages"]))
    uplink = Uplink(cfg.density_up, cfg.selector, cfg.value_codec_up)
    if _STATE_EF in context.state.array_records:
        uplink.ef.load_state_dict({"dtype": "float32", "residuals": _tensors(context.state.array_records[_STATE_EF])})

    msg.content = RecordDict({"arrays": ArrayRecord(torch_state_dict=state), CFG: msg.content.config_records[CFG],
                              "config": ConfigRecord({"server-round": int(down["round"])})})
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    new = _tensors(reply.content.array_records["arrays"])
    payload = uplink.encode(change(new, state), int(down["round"]), version)
    context.state[_STATE_MODEL] = ArrayRecord(torch_state_dict=state)
    context.state[_STATE_EF] = ArrayRecord(torch_state_dict=uplink.ef.residuals)
    context.state[_STATE_META] = ConfigRecord({"version": version})
    metrics = reply.content.metric_records.get("metrics", MetricRecord())
    partition = int(context.node_config.get("partition-id", context.node_id))
    reply.content = RecordDict({UP: ConfigRecord({"payload": payload, "version": version, "partition": partition}),
                                "metrics": metrics})
    return reply


@dataclass
class Faults:
    """Test and benchmark faults, by partition: sleep before replying in a round (a straggler), or raise (a dropout)."""

    sleep_s: dict[int, dict[int, float]] = field(default_factory=dict)  # partition -> {round: seconds}
    fail: dict[int, set[int]] = field(default_factory=dict)  # partition -> rounds in which it raises


def make_client_app(faults: Faults | None = None) -> ClientApp:
    faults = faults or Faults()
    app = ClientApp(mods=[sparse_delta_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = FedConfig.from_dict(json.loads(msg.content.config_records[CFG]["json"]))
        partition = int(context.node_config["partition-id"])
        rnd = int(msg.content.config_records["config"]["server-round"])
        trainer = LocalTrainer(cfg, split_clients(cfg.clients, cfg.tasks, cfg.split, cfg.seed)[partition])
        like = {n: p.detach() for n, p in trainer.model.named_parameters()}
        wire = _tensors(msg.content.array_records["arrays"])
        new, metrics = trainer.train(from_wire(wire, like, cfg.layout), rnd)
        if rnd in faults.fail.get(partition, set()):
            raise RuntimeError(f"injected dropout: partition {partition}, round {rnd}")
        time.sleep(faults.sleep_s.get(partition, {}).get(rnd, 0.0))
        content = RecordDict({"arrays": ArrayRecord(torch_state_dict=to_wire(new, cfg.layout)),
                              "metrics": MetricRecord({"num-examples": metrics["num_examples"],
                                                       "train-reward": metrics["train_reward"], "partition": partition})})
        return Message(content=content, reply_to=msg)
    @app.query()
    def query(msg: Message, context: Context) -> Message:
        LocalTrainer.warm_up()
        partition = int(context.node_config.get("partition-id", context.node_id))
        return Message(content=RecordDict({"partition": ConfigRecord({"id": partition})}), reply_to=msg)
    return app


def run_simulation(cfg: FedConfig, base: State, faults: Faults | None = None, evaluate_fn=None,
                   num_cpus: int = 2) -> dict:
    """Run `cfg` in Flower's simulation (one supernode per client, Ray backend). Returns {"strategy", "result"}."""
    from flwr.simulation import run_simulation as flwr_run_simulation

    sink: dict = {}
    flwr_run_simulation(server_app=make_server_app(cfg, base, sink, evaluate_fn), client_app=make_client_app(faults),
                        num_supernodes=cfg.clients,
                        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                        "init_args": {"num_cpus": num_cpus, "include_dashboard": False}})
    if "result" not in sink:
        raise RuntimeError("the Flower ServerApp did not finish (see the log above)")
    return sink


# --------------------------------------------------------------------- deployment runtime
# The components deploy/flower/pyproject.toml names. The run config (`flwr run --run-config`) has three
# strings: `set` (FedConfig overrides, `sparsecomm federated --set` syntax, separated by spaces, none inside
# a value), `base` (a save_pretrained directory on the SuperLink's machine, or "" for the built-in model) and
# `out` (where the ServerApp writes the round reports, the final held-out accuracy and the final model's
# fingerprint as JSON, or "").

def _deployment_main(grid: Grid, context: Context) -> None:
    import dataclasses
    import shlex

    from .cli import _overrides, base_state, finish, print_rounds
    from .loop import FedRun
    from .zeromq import fingerprint

    rc = context.run_config
    cfg = FedConfig.from_dict(_overrides(shlex.split(str(rc.get("set", "")), posix=False)))  # keeps quotes in values
    nodes = len(grid.get_node_ids())
    if nodes < cfg.quorum:
        print(f"sparsecomm: {nodes} SuperNodes connected, the quorum is {cfg.quorum}: rounds may close without it")
    base = base_state(cfg, str(rc.get("base", "")) or None)
    sink: dict = {}
    serve(grid, cfg, base, sink)  # the same strategy and rounds as the simulation
    local = FedRun(cfg, base)
    local.server = sink["strategy"].server  # evaluate the model the SuperNodes hold
    reports = [dataclasses.asdict(r) for r in sink["strategy"].reports]
    print_rounds(reports)
    finish(local, reports, str(rc.get("out", "")) or None, model_sha256=fingerprint(local.server.broadcast))


server_app = ServerApp()
server_app.main()(_deployment_main)
client_app = make_client_app()
