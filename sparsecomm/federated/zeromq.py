"""ZeroMQ transport for federated RL: the same FedServer and client parts as the in-process loop
and Flower (server.py, client.py), between processes over one ROUTER/DEALER pair (pyzmq, msgpack).

    sparsecomm federated --transport zmq-server --bind tcp://0.0.0.0:5600 --set clients=8 rounds=20
    sparsecomm federated --transport zmq-client --connect tcp://server:5600 --client 3   # on each client

Protocol (msgpack maps; the client always asks, the server answers every request):

    hello  {client}                          -> welcome {cfg: FedConfig JSON, base: fingerprint}
    poll   {client, version}                 -> train {round, downlinks: [SPCD...]} | wait {retry_s} | done {}
    upload {client, round, payload, weight}  -> ack {accepted, reason}
    bye    {client}                          -> ack {}     (a client leaving before the run ends)
    malformed, unknown op, wrong client      -> error {reason}          (the server keeps serving)

The client builds the base model itself, from the configuration the server sends (`model`,
`seed`; or the same `--base` checkpoint), and checks it against the server's fingerprint: a
client on another base is refused before it trains. It then receives every downlink message it
lacks, in order (a late or restarted client catches up from version 0: sparse messages, no full
model on the wire).

Rounds: the server samples clients (seed-fixed: the same clients as the loop and Flower), hands
each asked client its downlinks when it polls, and closes the round once every asked client has
uploaded, or at `deadline_s` (round 1: plus `startup_timeout_s`) with at least `quorum` accepted
uploads (fewer: nothing is applied, the next round starts). Uploads are validated by
FedServer.accept (codec CRCs and bounds, round, base version, names, shapes, budget) plus: from
a client asked this round, once. A refused upload is answered with its reason and reported.
After the last round every poll is answered `done`; the server stops once every client it
heard from was told, or after `drain_s`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time

import msgpack
import torch
import zmq

from .client import State, to_wire
from .config import FedConfig
from .loop import ClientRuntime, sample_clients
from .server import FedServer, RoundReport
from .split import split_clients

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 256 << 20  # larger frames are dropped by libzmq before they are buffered


def fingerprint(base_wire: State) -> str:
    """sha256 over the base model's wire tensors (names, shapes, fp32 bytes)."""
    h = hashlib.sha256()
    for name, t in base_wire.items():
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def default_base(cfg: FedConfig) -> State:
    """The built-in model `cfg.model` initialised from `cfg.seed` (what `sparsecomm federated` trains)."""
    from ..rl.models import build_model, char_tokenizer
    from .client import model_state

    return model_state(build_model(cfg.model, char_tokenizer(), seed=cfg.seed)[0])


def _pack(op: str, **fields) -> bytes:
    return msgpack.packb({"op": op, **fields}, use_bin_type=True)


class ZmqFedServer:
    """One federated run over a ROUTER socket; `serve()` runs every round and returns the reports."""

    def __init__(self, cfg: FedConfig, base_wire: State, bind: str = "tcp://127.0.0.1:0", *,
                 poll_s: float = 0.05, retry_s: float = 0.2, drain_s: float = 30.0):
        self.cfg, self.server = cfg, FedServer(cfg, base_wire)
        self.base = fingerprint(base_wire)
        self.poll_s, self.retry_s, self.drain_s = poll_s, retry_s, drain_s
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self.sock.bind(bind)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.reports: list[RoundReport] = []
        self.round, self.asked, self.uploaded = 0, set(), set()
        self.report: RoundReport | None = None
        self._uploads: list = []
        self.finished = False
        self.known: set[int] = set()  # clients that said hello
        self.told_done: set[int] = set()
        self.errors = 0  # malformed or refused requests answered with an error

    # ------------------------------------------------------------------ rounds
    def serve(self) -> list[RoundReport]:
        try:
            for rnd in range(1, self.cfg.rounds + 1):
                self._open(rnd)
                extra = self.cfg.startup_timeout_s if rnd == 1 else 0.0
                deadline = time.monotonic() + self.cfg.deadline_s + extra
                while self.uploaded < self.asked and time.monotonic() < deadline:
                    self._serve_once()
                self._close()
            self.finished = True
            until = time.monotonic() + self.drain_s
            while self.told_done < self.known and time.monotonic() < until:
                self._serve_once()
            return self.reports
        finally:
            self.close()

    def _open(self, rnd: int) -> None:
        self.round, self.asked, self.uploaded, self._uploads = rnd, set(sample_clients(self.cfg, rnd)), set(), []
        self.report = RoundReport(rnd, dense_bytes_per_client=self.server.dense_bytes)

    def _close(self) -> None:
        rep = self.report
        rep.missing = sorted(self.asked - self.uploaded)
        rep.applied = self.server.finish_round(self.round, self._uploads)
        self.reports.append(rep)
        log.info("round %d: accepted %s refused %s missing %s applied %s", rep.round, rep.accepted,
                 sorted(rep.refused), rep.missing, rep.applied)

    # ------------------------------------------------------------------ requests
    def _serve_once(self) -> None:
        if not self.sock.poll(int(self.poll_s * 1000)):
            return
        frames = self.sock.recv_multipart()
        ident, body = frames[0], frames[-1]
        try:
            reply = self._handle(msgpack.unpackb(body, raw=False, strict_map_key=True))
        except Exception as e:  # noqa: BLE001 - any bad request is answered, never fatal to the server
            self.errors += 1
            log.warning("federated server: bad request (%s)", e)
            reply = _pack("error", reason=f"bad request: {type(e).__name__}: {e}")
        self.sock.send_multipart([ident, reply])

    def _client(self, msg: dict) -> int:
        c = msg.get("client")
        if type(c) is not int or not 0 <= c < self.cfg.clients:
            raise ValueError(f"client {c!r} is not an int in [0, {self.cfg.clients})")
        return c

    def _handle(self, msg) -> bytes:
        if not isinstance(msg, dict):
            raise ValueError("a request is a msgpack map")
        op, c = msg.get("op"), self._client(msg)
        if op == "hello":
            self.known.add(c)
            return _pack("welcome", cfg=json.dumps(self.cfg.to_dict(), default=list), base=self.base)
        if op == "bye":  # a client leaving: not waited for when the run drains
            self.known.discard(c)
            return _pack("ack", accepted=True, reason="")
        if op == "poll":
            if self.finished:
                self.told_done.add(c)
                return _pack("done")
            version = msg.get("version")
            if type(version) is not int or not 0 <= version <= self.server.version:
                raise ValueError(f"version {version!r} is not an int in [0, {self.server.version}]")
            if c not in self.asked or c in self.uploaded:
                return _pack("wait", retry_s=self.retry_s)
            down = self.server.downlink_for(version)
            self.report.bytes_down += sum(len(m) for m in down)
            return _pack("train", round=self.round, downlinks=down)
        if op == "upload":
            payload, weight, rnd = msg.get("payload"), msg.get("weight"), msg.get("round")
            if not isinstance(payload, bytes) or not isinstance(weight, (int, float)) or type(rnd) is not int:
                raise ValueError("upload needs payload (bytes), weight (number) and round (int)")
            if rnd != self.round or c not in self.asked or c in self.uploaded:
                reason = (f"round {rnd} is not the open round {self.round}" if rnd != self.round
                          else f"client {c} was not asked in round {rnd}" if c not in self.asked
                          else f"client {c} already uploaded in round {rnd}")
                return _pack("ack", accepted=False, reason=reason)
            self.uploaded.add(c)
            self.report.bytes_up += len(payload)
            up, reason = self.server.accept(c, payload, rnd, float(weight))
            if up is None:
                self.report.refused[c] = reason
            else:
                self._uploads.append(up)
                self.report.accepted.append(c)
            return _pack("ack", accepted=up is not None, reason=reason)
        raise ValueError(f"unknown op {op!r}")

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


class ZmqFedClient:
    """One client process: hello, then poll / train / upload until the server says done."""

    def __init__(self, connect: str, client: int, base_for=None, *, timeout_s: float = 600.0,
                 leave_after: int | None = None):
        """`base_for(cfg) -> State`: the base model by parameter name (default: the built-in model
        `cfg.model` from `cfg.seed`, as `sparsecomm federated` builds it). `leave_after`: stop after
        uploading in that many rounds (a client that leaves the federation; the server's later rounds
        close at their deadline without it)."""
        self.client, self.timeout_s, self.base_for = client, timeout_s, base_for or default_base
        self.leave_after = leave_after
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self.sock.connect(connect)
        self.rounds: list[int] = []
        self.refused: dict[int, str] = {}

    def _ask(self, op: str, **fields) -> dict:
        self.sock.send(_pack(op, client=self.client, **fields))
        if not self.sock.poll(int(self.timeout_s * 1000)):
            raise TimeoutError(f"federated client {self.client}: no answer to {op!r} within {self.timeout_s:.0f} s")
        reply = msgpack.unpackb(self.sock.recv(), raw=False)
        if reply.get("op") == "error":
            raise RuntimeError(f"federated server refused {op!r}: {reply.get('reason')}")
        return reply

    def run(self) -> "ZmqFedClient":
        try:
            welcome = self._ask("hello")
            cfg = FedConfig.from_dict(json.loads(welcome["cfg"]))
            base = self.base_for(cfg)
            if fingerprint(to_wire(base, cfg.layout)) != welcome["base"]:
                raise ValueError(f"federated client {self.client}: this base model differs from the server's "
                                 f"(fingerprint {welcome['base']}): build it from the same --base / model and seed")
            runtime = ClientRuntime(cfg, split_clients(cfg.clients, cfg.tasks, cfg.split, cfg.seed)[self.client], base)
            while True:
                msg = self._ask("poll", version=runtime.version)
                if msg["op"] == "done":
                    return self
                if msg["op"] == "wait":
                    time.sleep(float(msg["retry_s"]))
                    continue
                payload, weight = runtime.round(msg["round"], msg["downlinks"])
                ack = self._ask("upload", round=msg["round"], payload=payload, weight=float(weight))
                self.rounds.append(msg["round"])
                if not ack["accepted"]:
                    self.refused[msg["round"]] = ack["reason"]
                    log.warning("client %d: round %d upload refused: %s", self.client, msg["round"], ack["reason"])
                if self.leave_after is not None and len(self.rounds) >= self.leave_after:
                    self._ask("bye")
                    return self
        finally:
            self.sock.close(0)
            self.ctx.term()
