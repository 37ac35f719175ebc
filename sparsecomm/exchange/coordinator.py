"""The ZeroMQ coordinator: aggregates workers' sparse deltas, owns the canonical weights version,
and streams aggregates to trainers and rollout (inference) workers.

    sparsecomm coordinator --bind tcp://127.0.0.1:5555 --quorum 1.0 --deadline-s 10 \\
        --checkpoint-dir runs/coord --metrics-port 9500 [--curve-secret-key server.key_secret \\
        --allow-keys clients/]

One process, one ROUTER socket, one poll loop (protocol: protocol.py). Per round the
coordinator collects one push per trainer, closes the round when every live trainer has
pushed - or, once `deadline_s` has passed since the round's first push, when at least
`quorum` x live trainers have (the first round also waits for `min_trainers` to join) - and then:

    mean   = mean over contributors of their deltas (union of indices), late deltas folded in
    out    = mean, or top-k(residual + mean) with coordinator-side error feedback (--resparsify)
    W     += decode(encode(out));  version += 1;  hash = sha256(hash || payload)
    send `aggregate` to every trainer; `rollout` deltas (exact bf16 changes, or the delta) to
    rollout workers; a full `anchor` every --anchor-every versions; checkpoint every N rounds.

Faults: a trainer silent for `heartbeat_timeout_s` is dropped from the live set (so a killed
worker stalls a round at most that long, or `deadline_s` with a quorum below 1); it can rejoin
and resync (replayed aggregates if still retained, else a chunked snapshot). Bad input is
answered with an `error` reply and counted by reason; the coordinator never crashes and state
changes only after a message has been fully validated. Memory is bounded: weights (4 B/param),
optional residual and bf16 view, at most one pending and one late delta per trainer, and the
last `retain` aggregate payloads.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zmq

from ..codec import CodecError, decode, encode
from ..compress import ErrorFeedback, SampledThreshold, k_for
from ..delta import SparseDelta
from .base import mean_of_deltas
from .protocol import OPS_IN, REASONS, ROLES, ProtocolError, chain, field as hfield, genesis_hash, pack, unpack_header

log = logging.getLogger("sparsecomm.coordinator")
CHUNK_BYTES = 8 << 20


@dataclass
class CoordinatorConfig:
    bind: str = "tcp://127.0.0.1:5555"
    min_trainers: int = 1  # rounds wait until this many trainers have joined this process (a start barrier)
    quorum: float = 1.0  # fraction of live trainers needed to close a round once the deadline passed
    deadline_s: float = 10.0  # after a round's first push
    late: str = "fold"  # "fold": late deltas join the next round; "drop": counted and refused
    heartbeat_timeout_s: float = 5.0
    resparsify_density: float = 0.0  # 0: send the exact mean; else top-k of it with coordinator error feedback
    value_codec: str = "fp32"  # for aggregates (every replica applies the decoded payload, so any codec is consistent)
    retain: int = 64  # aggregates kept for replay to workers that fell behind
    anchor_every: int = 0  # full weights to rollout workers every N versions (0: only on join)
    rollout_bf16: bool = True  # rollout workers get the exact bf16 changes (lossless for a bf16 copy)
    checkpoint_dir: str | None = None
    checkpoint_every: int = 10  # rounds
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    max_frame_bytes: int = 1 << 30
    max_abs_value: float = 1e4  # a delta entry larger than this is a lie or a bug: refused
    curve_secret_key: str | None = None  # path to the server's .key_secret (zmq.auth certificate)
    allow_keys: str | None = None  # directory of allowed clients' public .key files
    poll_ms: int = 50

    def __post_init__(self):
        if self.min_trainers < 1:
            raise ValueError(f"min_trainers must be >= 1, got {self.min_trainers}")
        if not 0 < self.quorum <= 1:
            raise ValueError(f"quorum must be in (0, 1], got {self.quorum}")
        if self.late not in ("fold", "drop"):
            raise ValueError(f"late must be 'fold' or 'drop', got {self.late!r}")
        if self.deadline_s <= 0 or self.heartbeat_timeout_s <= 0 or self.retain < 1 or self.checkpoint_every < 1:
            raise ValueError("deadline_s and heartbeat_timeout_s must be > 0; retain and checkpoint_every >= 1")
        if not 0 <= self.resparsify_density < 1:
            raise ValueError(f"resparsify_density must be in [0, 1), got {self.resparsify_density}")
        if (self.curve_secret_key is None) != (self.allow_keys is None):
            raise ValueError("CURVE needs both curve_secret_key and allow_keys")


@dataclass
class Peer:
    identity: bytes
    role: str
    last_seen: float
    version: int = 0
    in_sync: bool = False


@dataclass
class Metrics:
    registry: object = None
    rounds: object = None
    bytes_in: object = None
    bytes_out: object = None
    alive: object = None
    stragglers: object = None
    rejected: object = None
    latency: object = None
    late: object = None
    version: object = None
    server: object = None

    @classmethod
    def create(cls, port: int | None, addr: str) -> "Metrics":
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

        r = CollectorRegistry()
        m = cls(registry=r,
                rounds=Counter("sparsecomm_coordinator_rounds", "Rounds aggregated", registry=r),
                bytes_in=Counter("sparsecomm_coordinator_received_bytes", "Bytes received (all frames)", registry=r),
                bytes_out=Counter("sparsecomm_coordinator_sent_bytes", "Bytes sent (all frames)", registry=r),
                alive=Gauge("sparsecomm_coordinator_workers_alive", "Joined workers seen within the heartbeat timeout",
                            ["role"], registry=r),
                stragglers=Counter("sparsecomm_coordinator_stragglers", "Trainers missing when a round closed", registry=r),
                rejected=Counter("sparsecomm_coordinator_rejected_messages", "Messages refused, by reason", ["reason"],
                                 registry=r),
                latency=Histogram("sparsecomm_coordinator_round_seconds", "First push to aggregate sent", registry=r,
                                  buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)),
                late=Counter("sparsecomm_coordinator_late_deltas", "Deltas that missed their round", ["action"], registry=r),
                version=Gauge("sparsecomm_coordinator_weights_version", "Aggregates applied", registry=r))
        for reason in REASONS:
            m.rejected.labels(reason=reason)
        for role in ROLES:
            m.alive.labels(role=role)
        if port is not None:
            m.server, _ = start_http_server(port, addr=addr, registry=r)
        return m


@dataclass
class State:
    """What a checkpoint holds."""

    fingerprint: str | None = None
    numel: int = 0
    weights: torch.Tensor | None = None
    version: int = 0
    hash: str = ""
    round: int = 0
    residual: torch.Tensor | None = None
    retained: deque = field(default_factory=deque)  # (version, round, parent hash, hash, payload bytes)


class Coordinator:
    def __init__(self, cfg: CoordinatorConfig, context: zmq.Context | None = None):
        self.cfg = cfg
        self.ctx = context or zmq.Context.instance()
        self.state = State(retained=deque(maxlen=cfg.retain))
        self.peers: dict[str, Peer] = {}
        self.pending: dict[str, SparseDelta] = {}
        self.late_deltas: list[SparseDelta] = []
        self.round_started: float | None = None
        self.trainers_seen: set[str] = set()  # for the min_trainers start barrier
        self.init_parts: dict[int, int] = {}  # chunk index -> bytes received
        self.init_total: int | None = None
        self._init_buf: torch.Tensor | None = None
        self.init_owner: str | None = None
        self.bf16_view: torch.Tensor | None = None
        self.ef = ErrorFeedback()
        self.selector = SampledThreshold(seed=0)
        self.stop = False
        self._req = None
        self.metrics = Metrics.create(cfg.metrics_port, cfg.metrics_addr)
        self.auth = None
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_frame_bytes + 65536)  # zmq drops larger messages itself
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if cfg.curve_secret_key:
            self._setup_curve()
        self.sock.bind(cfg.bind)
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        if cfg.checkpoint_dir and (Path(cfg.checkpoint_dir) / "coordinator.pt").exists():
            self._restore()

    # ------------------------------------------------------------------ setup
    def _setup_curve(self) -> None:
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        public, secret = zmq.auth.load_certificate(self.cfg.curve_secret_key)
        if secret is None:
            raise ValueError(f"{self.cfg.curve_secret_key} holds no secret key")
        self.auth = ThreadAuthenticator(self.ctx)
        self.auth.start()
        self.auth.configure_curve(domain="*", location=str(self.cfg.allow_keys))
        self.sock.curve_secretkey, self.sock.curve_publickey, self.sock.curve_server = secret, public, True

    def _restore(self) -> None:
        ck = torch.load(Path(self.cfg.checkpoint_dir) / "coordinator.pt", weights_only=False)
        st = self.state
        st.fingerprint, st.numel, st.weights, st.version, st.hash, st.round = (
            ck["fingerprint"], ck["numel"], ck["weights"], ck["version"], ck["hash"], ck["round"])
        st.residual = ck["residual"]
        st.retained = deque([tuple(r) for r in ck["retained"]], maxlen=self.cfg.retain)
        if st.residual is not None:
            self.ef.residuals["agg"] = st.residual
        if self.cfg.rollout_bf16 and st.weights is not None:
            self.bf16_view = st.weights.to(torch.bfloat16)
        self.metrics.version.set(st.version)
        log.info("restored checkpoint: version %d round %d", st.version, st.round)

    def checkpoint(self) -> None:
        if not self.cfg.checkpoint_dir or self.state.weights is None:
            return
        d = Path(self.cfg.checkpoint_dir)
        d.mkdir(parents=True, exist_ok=True)
        st = self.state
        tmp = d / "coordinator.pt.tmp"
        torch.save({"fingerprint": st.fingerprint, "numel": st.numel, "weights": st.weights, "version": st.version,
                    "hash": st.hash, "round": st.round, "residual": self.ef.residuals.get("agg"),
                    "retained": list(st.retained)}, tmp)
        os.replace(tmp, d / "coordinator.pt")  # atomic: a crash leaves the old or the new checkpoint

    # ------------------------------------------------------------------ main loop
    def serve(self, max_seconds: float | None = None) -> None:
        t_end = None if max_seconds is None else time.monotonic() + max_seconds
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        try:
            while not self.stop and (t_end is None or time.monotonic() < t_end):
                if poller.poll(self.cfg.poll_ms):
                    while True:  # drain what is queued
                        try:
                            frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self.handle(frames)
                self.tick()
        finally:
            self.close()

    def close(self) -> None:
        try:
            self.checkpoint()
        finally:
            self.sock.close(0)
            if self.auth is not None:
                self.auth.stop()
            if self.metrics.server is not None:
                self.metrics.server.shutdown()
                self.metrics.server.server_close()

    def send(self, identity: bytes, header: bytes, *frames) -> None:
        try:
            self.sock.send_multipart([identity, header, *frames], copy=False)
        except zmq.ZMQError as e:  # a peer that vanished must not take the coordinator down
            log.warning("send failed: %s", e)
            return
        self.metrics.bytes_out.inc(len(header) + sum(len(f) for f in frames))

    def reject(self, identity: bytes, err: ProtocolError) -> None:
        self.metrics.rejected.labels(reason=err.reason).inc()
        log.info("rejected (%s): %s", err.reason, err.detail)
        self.send(identity, pack("error", reason=err.reason, detail=err.detail[:500], req=self._req))

    def handle(self, frames) -> None:
        identity = bytes(frames[0].buffer) if frames else b""
        self._req = None  # the request id that replies echo, so clients can ignore stale replies
        try:
            size = sum(len(f.buffer) for f in frames)
            self.metrics.bytes_in.inc(size)
            if len(frames) < 2:
                raise ProtocolError("malformed", "empty message")
            if size > self.cfg.max_frame_bytes:
                raise ProtocolError("oversized", f"message of {size} bytes (limit {self.cfg.max_frame_bytes})")
            h = unpack_header(bytes(frames[1].buffer))
            self._req = h.get("req") if type(h.get("req")) is int else None
            op = h["op"]
            handler = getattr(self, f"on_{op}") if op in OPS_IN else None
            if handler is None:
                raise ProtocolError("unknown_op", f"unknown op {op!r}")
            if op != "join":
                worker = hfield(h, "worker", str)
                peer = self.peers.get(worker)
                if peer is None or peer.identity != identity:
                    raise ProtocolError("unknown_worker", f"worker {worker!r} has not joined from this connection")
                peer.last_seen = time.monotonic()
            handler(identity, h, [f.buffer for f in frames[2:]])
        except ProtocolError as e:
            self.reject(identity, e)
        except Exception as e:  # never crash on input; count and report it
            log.exception("internal error while handling a message")
            self.reject(identity, ProtocolError("internal", f"{type(e).__name__}: {e}"))

    # ------------------------------------------------------------------ ops
    def on_join(self, identity, h, frames) -> None:
        worker = hfield(h, "worker", str)
        role = hfield(h, "role", str)
        if role not in ROLES:
            raise ProtocolError("bad_field", f"role {role!r} not in {ROLES}")
        fp = hfield(h, "fingerprint", str)
        numel = hfield(h, "numel", int, 1, 1 << 40)
        version = hfield(h, "version", int, 0, 1 << 62)
        chain_hash = hfield(h, "hash", str, allow_empty=True)  # empty: a worker with no chain yet
        st = self.state
        if st.fingerprint is not None and (fp != st.fingerprint or numel != st.numel):
            raise ProtocolError("fingerprint", f"model fingerprint {fp}/{numel} differs from {st.fingerprint}/{st.numel}")
        old = self.peers.get(worker)
        if old is not None and old.identity != identity:
            self.pending.pop(worker, None)  # a rejoin from a new connection: the old one is gone
        need_init = st.weights is None and role == "trainer" and self.init_owner in (None, worker)
        if st.weights is None and not need_init:
            raise ProtocolError("not_ready", "the coordinator has no weights yet; a trainer must join first")
        if st.fingerprint is None:
            st.fingerprint, st.numel = fp, numel
        in_sync = not need_init and version == st.version and chain_hash == st.hash
        # replayable: we still hold the aggregate that follows exactly the state the worker is in
        replayable = not need_init and not in_sync and any(
            v == version + 1 and parent == chain_hash for v, _, parent, _, _ in st.retained)
        self.peers[worker] = Peer(identity, role, time.monotonic(), version, in_sync)
        if role == "trainer":
            self.trainers_seen.add(worker)
        if need_init:
            self.init_owner = worker
        self.send(identity, pack("welcome", version=st.version, hash=st.hash, round=st.round, numel=st.numel,
                                 req=self._req, need_init=need_init, need_sync=bool(replayable),
                                 need_snapshot=not need_init and not in_sync and not replayable))
        self._update_alive()

    def on_init(self, identity, h, frames) -> None:
        worker = h["worker"]
        st = self.state
        if st.weights is not None or worker != self.init_owner:
            raise ProtocolError("init_conflict", "weights are already initialised or another trainer is seeding them")
        total = hfield(h, "total", int, 1, 1 << 20)
        index = hfield(h, "index", int, 0, total - 1)
        offset = hfield(h, "offset", int, 0, st.numel * 4)
        if len(frames) != 1 or offset + len(frames[0]) > st.numel * 4 or len(frames[0]) % 4 or offset % 4:
            raise ProtocolError("shape_mismatch", "init chunk does not fit the model's fp32 weights")
        if self.init_total not in (None, total) or index in self.init_parts:
            raise ProtocolError("bad_field", "init chunk count changed or chunk repeated")
        if self.init_total is None:
            self.init_total, self._init_buf = total, torch.empty(st.numel, dtype=torch.float32)
        raw = self._init_buf.numpy().view(np.uint8)
        raw[offset:offset + len(frames[0])] = np.frombuffer(frames[0], dtype=np.uint8)  # one copy, into place
        self.init_parts[index] = len(frames[0])
        if len(self.init_parts) < total:
            return
        w, covered = self._init_buf, sum(self.init_parts.values())
        self.init_parts.clear()
        self.init_total, self._init_buf = None, None
        if covered != st.numel * 4:
            raise ProtocolError("shape_mismatch", f"init chunks cover {covered} of {st.numel * 4} bytes")
        if not bool(torch.isfinite(w).all()):
            raise ProtocolError("value_out_of_range", "initial weights contain NaN or infinity")
        st.weights, st.version, st.hash = w, 0, genesis_hash(st.fingerprint, w.numpy())
        if self.cfg.rollout_bf16:
            self.bf16_view = w.to(torch.bfloat16)
        peer = self.peers[worker]
        peer.in_sync, peer.version = True, 0
        self.send(identity, pack("welcome", version=0, hash=st.hash, round=st.round, numel=st.numel,
                                 req=self._req, need_init=False, need_sync=False, need_snapshot=False))

    def on_heartbeat(self, identity, h, frames) -> None:
        pass  # last_seen was refreshed in handle()

    def on_leave(self, identity, h, frames) -> None:
        self.peers.pop(h["worker"], None)
        self.pending.pop(h["worker"], None)
        self._update_alive()

    def on_sync(self, identity, h, frames) -> None:
        worker = h["worker"]
        since = hfield(h, "from_version", int, 0, 1 << 62)
        replay = [entry for entry in self.state.retained if entry[0] > since]
        if not replay or replay[0][0] != since + 1:
            raise ProtocolError("stale", f"aggregates after version {since} are no longer retained: ask for a snapshot")
        for v, r, parent, hh, p in replay:
            self.send(identity, pack("aggregate", round=r, version=v, hash=hh, parent_hash=parent, contributors=[],
                                     late_folded=0), p)
        self.send(identity, pack("synced", version=self.state.version, hash=self.state.hash, count=len(replay)))
        self._mark_synced(worker)

    def _send_chunks(self, identity: bytes, op: str, tensor: torch.Tensor, **fields) -> None:
        """A tensor's raw bytes in CHUNK_BYTES pieces: {index, total, offset} tell the receiver where."""
        raw = tensor.view(torch.int16 if tensor.dtype == torch.bfloat16 else tensor.dtype).numpy().view(np.uint8)
        total = max(1, math.ceil(raw.size / CHUNK_BYTES))
        for i in range(total):
            self.send(identity, pack(op, version=self.state.version, hash=self.state.hash, index=i, total=total,
                                     offset=i * CHUNK_BYTES, **fields), memoryview(raw[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES]))

    def on_snapshot(self, identity, h, frames) -> None:
        if self.state.weights is None:
            raise ProtocolError("not_ready", "no weights yet")
        self._send_chunks(identity, "snapshot", self.state.weights)
        self._mark_synced(h["worker"])

    def _mark_synced(self, worker: str) -> None:
        peer = self.peers.get(worker)
        if peer is not None:
            peer.in_sync, peer.version = True, self.state.version

    def on_push(self, identity, h, frames) -> None:
        worker = h["worker"]
        st, peer = self.state, self.peers[worker]
        if peer.role != "trainer":
            raise ProtocolError("bad_field", "only trainers push deltas")
        rnd = hfield(h, "round", int, 0, 1 << 62)
        base = hfield(h, "base_version", int, 0, 1 << 62)
        hfield(h, "step", int, 0, 1 << 62)
        if len(frames) != 1:
            raise ProtocolError("malformed", f"push carries {len(frames)} frames, expected 1")
        try:
            d = decode(frames[0])
        except CodecError as e:
            raise ProtocolError("bad_payload", str(e)) from None
        if d.shape != (st.numel,):
            raise ProtocolError("shape_mismatch", f"delta shape {d.shape}, model has ({st.numel},)")
        if d.k and float(d.values.abs().max()) > self.cfg.max_abs_value:
            raise ProtocolError("value_out_of_range", f"|value| {float(d.values.abs().max()):.3g} > {self.cfg.max_abs_value}")
        if rnd > st.round or base > st.version:
            raise ProtocolError("bad_field", f"push for round {rnd} / version {base} from the future (now {st.round} / {st.version})")
        if rnd < st.round or base < st.version:
            self.metrics.late.labels(action=self.cfg.late).inc()
            if self.cfg.late == "drop":
                raise ProtocolError("stale", f"round {rnd} already closed (now {st.round}); delta dropped")
            if len(self.late_deltas) >= max(1, sum(p.role == "trainer" for p in self.peers.values())):
                raise ProtocolError("stale", "late-delta buffer full; delta dropped")
            self.late_deltas.append(d.with_values(d.values.float()))
            return
        if worker in self.pending:
            raise ProtocolError("duplicate", f"worker {worker!r} already pushed for round {rnd}")
        self.pending[worker] = d.with_values(d.values.float())
        if self.round_started is None:
            self.round_started = time.monotonic()
        self._maybe_close_round()

    # ------------------------------------------------------------------ rounds
    def live_trainers(self) -> list[str]:
        return [w for w, p in self.peers.items() if p.role == "trainer" and p.in_sync]

    def _update_alive(self) -> None:
        for role in ROLES:
            self.metrics.alive.labels(role=role).set(sum(p.role == role for p in self.peers.values()))

    def tick(self) -> None:
        now = time.monotonic()
        for w, p in list(self.peers.items()):
            if now - p.last_seen > self.cfg.heartbeat_timeout_s:
                log.info("worker %s timed out", w)
                del self.peers[w]
                self.pending.pop(w, None)
                self._update_alive()
        self._maybe_close_round()

    def _maybe_close_round(self) -> None:
        if not self.pending or len(self.trainers_seen) < self.cfg.min_trainers:
            return
        live = self.live_trainers()
        done = all(w in self.pending for w in live)
        late = self.round_started is not None and time.monotonic() - self.round_started >= self.cfg.deadline_s
        if done or (late and len(self.pending) >= math.ceil(self.cfg.quorum * len(live))):
            self.metrics.stragglers.inc(sum(w not in self.pending for w in live))
            self.close_round()

    def close_round(self) -> None:
        st = self.state
        contributors = sorted(self.pending)
        deltas = [self.pending[w] for w in contributors] + self.late_deltas  # fixed order: deterministic
        mean = mean_of_deltas(deltas, st.numel, sum(d.k for d in deltas))
        out = mean
        if self.cfg.resparsify_density > 0:
            e = self.ef.compensate("agg", mean.to_dense())
            out = self.selector.select(e, k_for(st.numel, self.cfg.resparsify_density))
        payload = encode(out, "auto", self.cfg.value_codec)
        applied = decode(payload)  # what every replica will apply, bit for bit
        if self.cfg.resparsify_density > 0:
            self.ef.update("agg", applied)
        applied.add_to(st.weights)
        parent = st.hash
        st.version += 1
        st.hash = chain(parent, payload)
        st.retained.append((st.version, st.round, parent, st.hash, payload))
        header = pack("aggregate", round=st.round, version=st.version, hash=st.hash, parent_hash=parent,
                      contributors=contributors, late_folded=len(self.late_deltas))
        for w, p in self.peers.items():
            if p.role == "trainer" and p.in_sync:
                self.send(p.identity, header, payload)
                p.version = st.version
        self._send_rollouts(applied)
        if self.round_started is not None:
            self.metrics.latency.observe(time.monotonic() - self.round_started)
        self.metrics.rounds.inc()
        self.metrics.version.set(st.version)
        st.round += 1
        self.pending.clear()
        self.late_deltas.clear()
        self.round_started = None
        if st.round % self.cfg.checkpoint_every == 0:
            self.checkpoint()

    def _send_rollouts(self, applied: SparseDelta) -> None:
        st = self.state
        rollouts = [p for p in self.peers.values() if p.role == "rollout" and p.in_sync]
        if not rollouts:
            if self.bf16_view is not None:  # keep the view current for rollout workers that join later
                self.bf16_view[applied.indices] = st.weights[applied.indices].to(torch.bfloat16)
            return
        if self.cfg.rollout_bf16:
            # Only entries touched by this aggregate can change; send those whose bf16 bits changed.
            idx = applied.indices
            new = st.weights[idx].to(torch.bfloat16)
            changed = new.view(torch.int16) != self.bf16_view[idx].view(torch.int16)
            self.bf16_view[idx] = new
            d = SparseDelta(idx[changed], new[changed], (st.numel,), torch.bfloat16)
            payload, kind = encode(d, "auto", "bf16"), "bf16_values"
        else:
            payload, kind = encode(applied, "auto", self.cfg.value_codec), "delta"
        header = pack("rollout", version=st.version, hash=st.hash, kind=kind)
        anchor = self.cfg.anchor_every and st.version % self.cfg.anchor_every == 0
        for p in rollouts:
            self.send(p.identity, header, payload)
            if anchor:
                self._send_anchor(p.identity)
            p.version = st.version

    def _send_anchor(self, identity: bytes) -> None:
        src = self.bf16_view if self.cfg.rollout_bf16 else self.state.weights
        self._send_chunks(identity, "anchor", src, dtype="bfloat16" if src.dtype == torch.bfloat16 else "float32")


# ---------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    d = CoordinatorConfig()
    p.add_argument("--bind", default=d.bind, help=f"ZeroMQ endpoint to bind (default {d.bind})")
    p.add_argument("--min-trainers", type=int, default=d.min_trainers,
                   help="the first round waits until this many trainers have joined (start barrier)")
    p.add_argument("--quorum", type=float, default=d.quorum, help="fraction of live trainers that closes a round after the deadline")
    p.add_argument("--deadline-s", type=float, default=d.deadline_s, help="seconds after a round's first push")
    p.add_argument("--late", choices=["fold", "drop"], default=d.late, help="what happens to deltas that miss their round")
    p.add_argument("--heartbeat-timeout-s", type=float, default=d.heartbeat_timeout_s)
    p.add_argument("--resparsify-density", type=float, default=d.resparsify_density,
                   help="send top-k of the mean with coordinator error feedback (0: the exact mean)")
    p.add_argument("--value-codec", default=d.value_codec, help="value codec of aggregates (default fp32)")
    p.add_argument("--retain", type=int, default=d.retain, help="aggregates kept for replay to workers that fell behind")
    p.add_argument("--anchor-every", type=int, default=d.anchor_every, help="full weights to rollout workers every N versions")
    p.add_argument("--rollout-full-deltas", action="store_true", help="send rollout workers the fp32 delta, not exact bf16 changes")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="rounds between checkpoints")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus endpoint port (default: off)")
    p.add_argument("--metrics-addr", default=d.metrics_addr)
    p.add_argument("--max-frame-bytes", type=int, default=d.max_frame_bytes)
    p.add_argument("--max-abs-value", type=float, default=d.max_abs_value, help="refuse deltas with larger entries")
    p.add_argument("--curve-secret-key", default=None, help="server certificate (.key_secret) from `sparsecomm keys`")
    p.add_argument("--allow-keys", default=None, help="directory of allowed client public keys (.key)")
    p.add_argument("--max-seconds", type=float, default=None, help="stop after this long (default: run until killed)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s coordinator %(levelname)s %(message)s")
    cfg = CoordinatorConfig(bind=args.bind, min_trainers=args.min_trainers, quorum=args.quorum, deadline_s=args.deadline_s, late=args.late,
                            heartbeat_timeout_s=args.heartbeat_timeout_s, resparsify_density=args.resparsify_density,
                            value_codec=args.value_codec, retain=args.retain, anchor_every=args.anchor_every,
                            rollout_bf16=not args.rollout_full_deltas, checkpoint_dir=args.checkpoint_dir,
                            checkpoint_every=args.checkpoint_every, metrics_port=args.metrics_port,
                            metrics_addr=args.metrics_addr, max_frame_bytes=args.max_frame_bytes,
                            max_abs_value=args.max_abs_value, curve_secret_key=args.curve_secret_key,
                            allow_keys=args.allow_keys)
    coord = Coordinator(cfg)
    import signal

    def _stop(*_):
        coord.stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"coordinator listening on {coord.endpoint}", flush=True)
    coord.serve(args.max_seconds)
    return 0
