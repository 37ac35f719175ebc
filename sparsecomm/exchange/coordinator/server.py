"""The coordinator process: one ROUTER socket, one poll loop, dispatch of validated requests to
membership (join/init/sync/snapshot), rounds (rounds.py) and rollout publishing (rollout.py).

Liveness cannot be starved: the loop handles at most `max_messages_per_poll` messages between
two timer ticks, and the tick (heartbeat timeouts, round deadlines) runs every iteration, so a
flood of junk only slows rounds down - it cannot stop a dead trainer from being dropped or a
deadline from firing. Junk is cheap: every refused message costs its connection one token of
an error budget (`peer_error_rate_per_s`, `peer_error_burst`); a connection that has spent it
has its messages dropped unread (counted as `rate_limited`, no reply) until the budget refills.
ZeroMQ itself bounds each connection's queue (RCVHWM) and drops messages over
`max_frame_bytes` before they are read.

Identity: with CURVE, the ZAP handler authenticates the client's key and stamps every message
with it (the `User-Id` frame property); NAME.key in `allow_keys` may only act as worker NAME,
so holding one trainer's key does not let a client speak for another.
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import zmq

from .. import chunks
from ..protocol import OPS_IN, ROLES, ProtocolError, decay_field, field as hfield, genesis_hash, pack, unpack_header
from .checkpoint import Journal, load_checkpoint, save_checkpoint
from .config import CoordinatorConfig
from .metrics import Metrics
from .relay import PatchRelay
from .rollout import RolloutPublisher, send_tensor
from .rounds import Rounds
from .state import State

log = logging.getLogger("sparsecomm.coordinator")


@dataclass
class Peer:
    identity: bytes
    role: str
    last_seen: float
    version: int = 0
    in_sync: bool = False


class ErrorBudget:
    """A token bucket of refused messages per connection: past it, the connection is muted."""

    def __init__(self, rate_per_s: float, burst: int, max_tracked: int = 4096):
        self.rate, self.burst, self.max_tracked = rate_per_s, float(burst), max_tracked
        self._buckets: dict[bytes, list[float]] = {}  # identity -> [tokens, monotonic time of last update]

    def _refill(self, b: list[float], now: float) -> None:
        b[0], b[1] = min(self.burst, b[0] + (now - b[1]) * self.rate), now

    def muted(self, identity: bytes, now: float) -> bool:
        b = self._buckets.get(identity)
        if b is None:
            return False
        self._refill(b, now)
        return b[0] <= 0

    def charge(self, identity: bytes, now: float) -> None:
        b = self._buckets.get(identity)
        if b is None:
            if len(self._buckets) >= self.max_tracked:
                self.prune(now)
            b = self._buckets[identity] = [self.burst, now]
        self._refill(b, now)
        b[0] -= 1

    def prune(self, now: float) -> None:
        """Forget connections whose budget is full again; if that is not enough, forget all (fail open)."""
        for ident, b in list(self._buckets.items()):
            self._refill(b, now)
            if b[0] >= self.burst:
                del self._buckets[ident]
        if len(self._buckets) >= self.max_tracked:
            self._buckets.clear()


class Coordinator:
    def __init__(self, cfg: CoordinatorConfig, context: zmq.Context | None = None):
        self.cfg = cfg
        self.ctx = context or zmq.Context.instance()
        self.state = State(retained=deque(maxlen=cfg.retain))
        self.peers: dict[str, Peer] = {}
        self.trainers_seen: set[str] = set()  # for the min_trainers start barrier
        self.init_owner: str | None = None
        self._init: tuple[torch.Tensor, chunks.Assembler] | None = None
        self.stop = False
        self._req = None
        self.metrics = Metrics.create(cfg.metrics_port, cfg.metrics_addr)
        self._rate_limited = self.metrics.rejected.labels(reason="rate_limited")
        self.rounds = Rounds(cfg, self.state, self.metrics)
        self.rollout = RolloutPublisher(cfg, self.state, self.send)
        self.relay = PatchRelay(cfg, self.state, self.metrics, self.send, self.rollout_peers) if cfg.relay else None
        self.budget = ErrorBudget(cfg.peer_error_rate_per_s, cfg.peer_error_burst)
        self.journal = Journal(cfg.checkpoint_dir, cfg.journal_fsync) if cfg.checkpoint_dir and cfg.journal else None
        self._last_prune = time.monotonic()
        self.auth = None
        self.key_names: dict[str, str] | None = None  # z85 public key -> the worker id it may act as
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_frame_bytes + 65536)  # zmq drops larger messages itself
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if cfg.curve_secret_key:
            self._setup_curve()
        self.sock.bind(cfg.bind)
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        if cfg.checkpoint_dir:
            self._restore()

    # ------------------------------------------------------------------ setup
    def _setup_curve(self) -> None:
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        public, secret = zmq.auth.load_certificate(self.cfg.curve_secret_key)
        if secret is None:
            raise ValueError(f"{self.cfg.curve_secret_key} holds no secret key")
        self.key_names = {}
        for path in sorted(Path(self.cfg.allow_keys).glob("*.key")):
            key, _ = zmq.auth.load_certificate(str(path))
            self.key_names[key.decode("ascii")] = path.stem
        self.auth = ThreadAuthenticator(self.ctx)
        self.auth.start()
        self.auth.configure_curve(domain="*", location=str(self.cfg.allow_keys))  # User-Id: the client's z85 key
        self.sock.curve_secretkey, self.sock.curve_publickey, self.sock.curve_server = secret, public, True

    def _restore(self) -> None:
        """Checkpoint, then every journalled round after it: back at the last version anyone saw."""
        loaded = load_checkpoint(self.cfg.checkpoint_dir, self.cfg.retain)
        if loaded is not None:
            st, residual, selector_state = loaded
            for f in fields(State):  # in place: rounds and rollout hold this object
                setattr(self.state, f.name, getattr(st, f.name))
            if residual is not None:
                self.rounds.ef.residuals["agg"] = residual
            if selector_state is not None:
                self.rounds.selector.generator.set_state(selector_state)
            log.info("restored checkpoint: version %d round %d", self.state.version, self.state.round)
        replayed = 0
        if self.journal is not None:
            for rec in self.journal.records():
                agg = rec["aggregate"]
                if agg.version <= self.state.version:
                    continue  # covered by the checkpoint (a crash between checkpoint and journal reset)
                if self.state.weights is None or not self.rounds.replay(agg, rec["mean"], rec["selector"]):
                    log.error("journal record v%d does not follow v%d: ignored from here on", agg.version, self.state.version)
                    break
                replayed += 1
        if replayed:
            log.info("replayed %d journalled rounds: now version %d", replayed, self.state.version)
        self.metrics.version.set(self.state.version)
        self.rollout.reset()

    def checkpoint(self) -> None:
        if not self.cfg.checkpoint_dir or self.state.weights is None:
            return
        save_checkpoint(self.cfg.checkpoint_dir, self.state, self.rounds.ef.residuals.get("agg"), self.rounds.selector_state())
        if self.journal is not None:
            self.journal.reset()  # only after the checkpoint is durable

    # ------------------------------------------------------------------ main loop
    def serve(self, max_seconds: float | None = None) -> None:
        t_end = None if max_seconds is None else time.monotonic() + max_seconds
        try:
            while not self.stop and (t_end is None or time.monotonic() < t_end):
                if self.sock.poll(self.cfg.poll_ms):
                    for _ in range(self.cfg.max_messages_per_poll):  # bounded: the tick below always runs
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
            self.metrics.close()
            if self.journal is not None:
                self.journal.close()

    def send(self, identity: bytes, header: bytes, *frames) -> None:
        try:
            self.sock.send_multipart([identity, header, *frames], copy=False)
        except zmq.ZMQError as e:  # a peer that vanished must not take the coordinator down
            log.warning("send failed: %s", e)
            return
        self.metrics.bytes_out.inc(len(header) + sum(len(f) for f in frames))

    def reject(self, identity: bytes, err: ProtocolError) -> None:
        self.metrics.rejected.labels(reason=err.reason).inc()
        log.debug("rejected (%s): %s", err.reason, err.detail)
        self.send(identity, pack("error", reason=err.reason, detail=err.detail[:500], req=self._req))

    def handle(self, frames) -> None:
        identity = bytes(frames[0].buffer) if frames else b""
        now = time.monotonic()
        size = sum(len(f.buffer) for f in frames)
        self.metrics.bytes_in.inc(size)
        if self.budget.muted(identity, now):  # spent its error budget: dropped unread, no reply
            self._rate_limited.inc()
            return
        self._req = None  # the request id that replies echo, so clients can ignore stale replies
        try:
            if len(frames) < 2:
                raise ProtocolError("malformed", "empty message")
            if size > self.cfg.max_frame_bytes:
                raise ProtocolError("oversized", f"message of {size} bytes (limit {self.cfg.max_frame_bytes})")
            h = unpack_header(frames[1].buffer)  # length checked before a byte is unpacked
            self._req = h.get("req") if type(h.get("req")) is int else None
            op = h["op"]
            handler = getattr(self, f"on_{op}") if op in OPS_IN else None
            if handler is None:
                raise ProtocolError("unknown_op", f"unknown op {op!r}")
            worker = hfield(h, "worker", str)
            if self.key_names is not None:
                owner = self.key_names.get(frames[1].get("User-Id"))
                if owner != worker:
                    raise ProtocolError("forbidden", f"this connection's CURVE key belongs to {owner!r}, not {worker!r}")
            if op != "join":
                peer = self.peers.get(worker)
                if peer is None or peer.identity != identity:
                    raise ProtocolError("unknown_worker", f"worker {worker!r} has not joined from this connection")
                peer.last_seen = now
            handler(identity, h, [f.buffer for f in frames[2:]])
        except ProtocolError as e:
            self.budget.charge(identity, now)
            self.reject(identity, e)
        except Exception as e:  # never crash on input; count and report it
            log.exception("internal error while handling a message")
            self.budget.charge(identity, now)
            self.reject(identity, ProtocolError("internal", f"{type(e).__name__}: {e}"))

    # ------------------------------------------------------------------ membership
    def on_join(self, identity, h, frames) -> None:
        worker = h["worker"]
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
        if self.relay is not None or role == "publisher":  # in relay mode publishers fix fingerprint and numel
            return self._join_relay(identity, h, worker, role, fp, numel)
        old = self.peers.get(worker)
        if old is not None and old.identity != identity:
            self.rounds.drop(worker)  # a rejoin from a new connection: the old one is gone, it will re-push
        need_init = st.weights is None and role == "trainer" and self.init_owner in (None, worker)
        if st.weights is None and not need_init:
            raise ProtocolError("not_ready", "the coordinator has no weights yet; a trainer must join first")
        if st.fingerprint is None:
            st.fingerprint, st.numel = fp, numel
        in_sync = not need_init and version == st.version and chain_hash == st.hash
        # replayable: we still hold the aggregate that follows exactly the state the worker is in
        replayable = not need_init and not in_sync and any(
            a.version == version + 1 and a.parent_hash == chain_hash for a in st.retained)
        # a restarted trainer asks which of its pushes since its checkpoint were counted (after the
        # rejoin dropped its open-round push above, so the answer is final for every round it names)
        pushed_since = h.get("pushed_since")
        if pushed_since is not None and (type(pushed_since) is not int or pushed_since < 0):
            raise ProtocolError("bad_field", f"pushed_since={pushed_since!r} is not a round number")
        self.peers[worker] = Peer(identity, role, time.monotonic(), version, in_sync)
        if role == "trainer":
            self.trainers_seen.add(worker)
        if need_init:
            self.init_owner = worker
        counted = {} if pushed_since is None else self.rounds.counted_since(worker, pushed_since)
        self.send(identity, pack("welcome", version=st.version, hash=st.hash, round=st.round, numel=st.numel,
                                 req=self._req, need_init=need_init, need_sync=bool(replayable),
                                 need_snapshot=not need_init and not in_sync and not replayable, **counted))
        self._update_alive()

    def _join_relay(self, identity, h, worker: str, role: str, fp: str, numel: int) -> None:
        """Relay mode's members: ZeRO-3 publishers (they fix the model) and, once version 1 exists, rollout workers."""
        st = self.state
        if self.relay is None:
            raise ProtocolError("bad_field", "role 'publisher' needs a relay coordinator (sparsecomm coordinator --relay)")
        if role == "trainer":
            raise ProtocolError("bad_field", "this coordinator relays ZeRO-3 patches (--relay): trainers push to a "
                                             "training coordinator")
        if role == "publisher":
            extra = self.relay.join(worker, h, fp, numel)
        elif st.version == 0:
            raise ProtocolError("not_ready", "the relay has no complete version yet (waiting for every rank's anchor)")
        else:
            extra = {}
        old = self.peers.get(worker)
        if old is not None and old.role == "publisher" and role != "publisher":
            self.relay.drop(worker)  # a publisher's id rejoining as something else gives up its rank
        self.peers[worker] = Peer(identity, role, time.monotonic(), st.version, False)
        self.send(identity, pack("welcome", version=st.version, hash=st.hash, round=0, numel=st.numel, req=self._req,
                                 need_init=False, need_sync=False, need_snapshot=role == "rollout", **extra))
        self._update_alive()

    def on_patch(self, identity, h, frames) -> None:
        if self.relay is None or self.peers[h["worker"]].role != "publisher":
            raise ProtocolError("bad_field", "only publishers send patches, to a relay coordinator (--relay)")
        self.send(identity, pack("ack", req=self._req, **self.relay.patch(h["worker"], h, frames)))

    def on_init(self, identity, h, frames) -> None:
        worker = h["worker"]
        st = self.state
        if st.weights is not None or worker != self.init_owner:
            raise ProtocolError("init_conflict", "weights are already initialised or another trainer is seeding them")
        total = hfield(h, "total", int, 1, 1 << 20)
        index = hfield(h, "index", int, 0, total - 1)
        offset = hfield(h, "offset", int, 0, st.numel * 4)
        if len(frames) != 1:
            raise ProtocolError("malformed", f"init carries {len(frames)} frames, expected 1")
        if self._init is None:
            buf = torch.empty(st.numel, dtype=torch.float32)
            self._init = (buf, chunks.Assembler(chunks.raw_bytes(buf)))
        w, assembler = self._init
        try:
            if not assembler.add(index, total, offset, frames[0]):
                return
        except chunks.ChunkError as e:
            raise ProtocolError("shape_mismatch", f"init chunk does not fit the model's fp32 weights: {e}") from None
        self._init = None
        if not bool(torch.isfinite(w).all()):
            raise ProtocolError("value_out_of_range", "initial weights contain NaN or infinity")
        st.weights, st.version, st.hash = w, 0, genesis_hash(st.fingerprint, w.numpy())
        self.rollout.reset()
        self.checkpoint()  # the journal needs a base to replay onto
        peer = self.peers[worker]
        peer.in_sync, peer.version = True, 0
        self.send(identity, pack("welcome", version=0, hash=st.hash, round=st.round, numel=st.numel,
                                 req=self._req, need_init=False, need_sync=False, need_snapshot=False))

    def on_heartbeat(self, identity, h, frames) -> None:
        pass  # last_seen was refreshed in handle()

    def on_leave(self, identity, h, frames) -> None:
        self.peers.pop(h["worker"], None)
        self.rounds.drop(h["worker"])
        if self.relay is not None:
            self.relay.drop(h["worker"])
        self._update_alive()

    def on_sync(self, identity, h, frames) -> None:
        worker = h["worker"]
        since = hfield(h, "from_version", int, 0, 1 << 62)
        replay = [a for a in self.state.retained if a.version > since]
        if not replay or replay[0].version != since + 1:
            raise ProtocolError("stale", f"aggregates after version {since} are no longer retained: ask for a snapshot")
        for a in replay:
            self.send(identity, a.header(), a.payload)
        self.send(identity, pack("synced", version=self.state.version, hash=self.state.hash, count=len(replay)))
        self._mark_synced(worker)

    def on_snapshot(self, identity, h, frames) -> None:
        if self.relay is not None:
            self.relay.send_snapshot(identity)
            self._mark_synced(h["worker"])
            return
        if self.state.weights is None:
            raise ProtocolError("not_ready", "no weights yet")
        # the round too: a trainer rejoining by snapshot pushes into it next (without it, into a stale
        # round: its delta would wait in the late buffer for a round nobody else opens)
        send_tensor(self.send, identity, "snapshot", self.state, self.state.weights, round=self.state.round)
        self._mark_synced(h["worker"])

    def _mark_synced(self, worker: str) -> None:
        peer = self.peers.get(worker)
        if peer is not None:
            peer.in_sync, peer.version = True, self.state.version

    def _update_alive(self) -> None:
        for role in ROLES:
            self.metrics.alive.labels(role=role).set(sum(p.role == role for p in self.peers.values()))

    # ------------------------------------------------------------------ rounds
    def on_push(self, identity, h, frames) -> None:
        worker = h["worker"]
        if self.peers[worker].role != "trainer":
            raise ProtocolError("bad_field", "only trainers push deltas")
        rnd = hfield(h, "round", int, 0, 1 << 62)
        base = hfield(h, "base_version", int, 0, 1 << 62)
        hfield(h, "step", int, 0, 1 << 62)
        decay = decay_field(h, self.state.numel)  # the weight decay this trainer applied since its last push
        if len(frames) != 1:
            raise ProtocolError("malformed", f"push carries {len(frames)} frames, expected 1")
        kind, agg = self.rounds.push(worker, rnd, base, frames[0], sum(p.role == "trainer" for p in self.peers.values()),
                                     decay)
        if kind == "ack":
            self.send(identity, pack("ack", round=rnd, status="pending", req=self._req))
        elif agg is not None:  # "reply" (already counted) or "late" (folded): the aggregate of its round
            self.send(identity, agg.header(), agg.payload)
        if kind == "pending":
            self._maybe_close_round()

    def rollout_peers(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.role == "rollout" and p.in_sync]

    def live_trainers(self) -> list[str]:
        return [w for w, p in self.peers.items() if p.role == "trainer" and p.in_sync]

    def tick(self) -> None:
        now = time.monotonic()
        for w, p in list(self.peers.items()):
            # publishers are not timed out: a relay version cannot complete without them anyway
            if p.role != "publisher" and now - p.last_seen > self.cfg.heartbeat_timeout_s:
                log.info("worker %s timed out", w)
                del self.peers[w]
                self.rounds.drop(w)
                self._update_alive()
        if now - self._last_prune > 10.0:
            self.budget.prune(now)
            self._last_prune = now
        self._maybe_close_round()

    def _maybe_close_round(self) -> None:
        pending = self.rounds.pending
        if not pending or len(self.trainers_seen) < self.cfg.min_trainers:
            return
        live = self.live_trainers()
        done = all(w in pending for w in live)
        started = self.rounds.started
        late = started is not None and time.monotonic() - started >= self.cfg.deadline_s
        if done or (late and len(pending) >= math.ceil(self.cfg.quorum * len(live))):
            self.metrics.stragglers.inc(sum(w not in pending for w in live))
            self.close_round()

    def close_round(self) -> None:
        agg, applied, mean_payload = self.rounds.close()
        if self.journal is not None:  # durable before anyone sees it: a restart resumes at this version
            t0 = time.perf_counter()
            selector = self.rounds.selector_state().numpy().tobytes() if self.cfg.resparsify_density > 0 else None
            self.journal.append(agg, mean_payload, selector)
            self.metrics.journal.observe(time.perf_counter() - t0)
        header = agg.header()
        for p in self.peers.values():
            if p.role == "trainer" and p.in_sync:
                self.send(p.identity, header, agg.payload)
                p.version = agg.version
        self.rollout.publish(applied, self.rollout_peers(), agg.decay)
        if self.state.round % self.cfg.checkpoint_every == 0:
            self.checkpoint()
