"""Clients of the ZeroMQ coordinator: trainers (CoordinatorClient, CoordinatorTransport for ASPG),
rollout/inference workers (RolloutClient) and, for a relay coordinator, ZeRO-3 ranks (PublisherClient). One DEALER socket each; protocol in protocol.py.

    transport = CoordinatorTransport("tcp://10.0.0.1:5555", worker_id=f"trainer-{rank}")
    opt = ASPG(model.parameters(), density=0.01, transport=transport)   # joins, seeds or syncs weights

    rollout = RolloutClient("tcp://10.0.0.1:5555", "rollout-0", fingerprint, numel)
    rollout.connect(); while True: rollout.poll(1.0); use(rollout.weights)   # a bf16 copy, exact

    publisher = PublisherClient(endpoint, "zero3-rank0")   # a ZeRO-3 rank, to a relay coordinator

Every aggregate is verified before it is applied: its version must follow the client's, and
sha256(client hash || payload) must equal the coordinator's hash (the chain in protocol.py).

No delta is lost or applied twice when things fail. A push that times out is re-sent on the
same link (the coordinator answers a re-send idempotently: `ack`, or the aggregate that already
counted it). If the coordinator no longer knows us (it restarted; its journal brought it back
at the last version anyone saw), the client rejoins and replays what it missed; each replayed
aggregate names its contributors, so the client knows whether its own pending delta is already
in one (then that push is done) or must be pushed again (then it is, into the current round).

Weight decay: ASPG decays the weights locally every step and tells the transport (`set_decay`);
the push carries that decay, the coordinator applies it to its own copy, and every aggregate
names the decay of its round (protocol.py). The weights of a trainer with a push outstanding
already carry its own decay ("owed" to the coordinator). Replayed aggregates are applied as
decay then payload, except that the first one after our version - the round we pushed for -
skips the decay we already applied; if we re-push into a later round, our decay is applied
again locally, because the coordinator will apply it again in that round. So a trainer that
resyncs ends with the coordinator's weights bit for bit, as do late joiners and rollout copies.

Client-side state: `version`, `hash` and `round` are re-derived from the coordinator at every
join, so a trainer restored from a checkpoint needs nothing from this module's state to
continue exactly; `CoordinatorTransport.state_dict()` carries the step counter it stamps on
pushes (informational) so a resumed run's headers match an uninterrupted one's.
"""
from __future__ import annotations

import logging
import time

import torch
import zmq

from ..codec import decode
from ..delta import SparseDelta
from . import chunks
from .outbox import Outbox
from .protocol import (REPLY_LIMITS, Decay, chain, decay_field, decay_wire, genesis_hash, model_fingerprint, pack,
                       unpack_header)

log = logging.getLogger("sparsecomm.coordinator_client")
# errors after which rejoining (and replaying or re-pushing) can succeed
_REJOIN_REASONS = ("unknown_worker", "bad_field", "stale", "hash_chain")


def _decay_of(h: dict, numel: int) -> Decay:
    """An aggregate's decay, validated like a request's (it comes from the network too)."""
    from .protocol import ProtocolError

    try:
        return decay_field(h, numel)
    except ProtocolError as e:
        raise CoordinatorError("protocol", f"aggregate decay: {e.detail}") from None


class CoordinatorError(RuntimeError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"coordinator refused: {reason}: {detail}")
        self.reason, self.detail = reason, detail


def curve_client_options(sock: zmq.Socket, client_secret_file: str, server_public_file: str) -> None:
    import zmq.auth

    pub, sec = zmq.auth.load_certificate(client_secret_file)
    server_pub, _ = zmq.auth.load_certificate(server_public_file)
    sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = sec, pub, server_pub


class _Connection:
    def __init__(self, endpoint: str, worker_id: str, role: str, timeout_s: float, heartbeat_s: float,
                 curve: tuple[str, str] | None, context: zmq.Context | None):
        self.endpoint, self.worker, self.role = endpoint, worker_id, role
        self.timeout_s, self.heartbeat_s = timeout_s, heartbeat_s
        self.ctx = context or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # a DEALER with no live connection (coordinator down, or our CURVE key refused) blocks on
        # send: bound it, so the caller gets a TimeoutError instead of a hang
        self.sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
        if curve:
            curve_client_options(self.sock, *curve)
        self.sock.connect(endpoint)
        self.sent_bytes = 0
        self.recv_bytes = 0
        self.req = 0  # id of the latest request; replies to older ones are stale
        self._last_send = time.monotonic()
        self.unsolicited_errors: tuple[str, ...] = ()  # errors answering heartbeats that recv raises

    def send(self, op: str, *frames, **fields) -> None:
        if op != "heartbeat":
            self.req += 1
            fields["req"] = self.req
        header = pack(op, worker=self.worker, **fields)
        try:
            self.sock.send_multipart([header, *frames], copy=False, flags=zmq.NOBLOCK if op == "heartbeat" else 0)
        except zmq.Again:
            if op == "heartbeat":
                return  # best effort; the next request will time out if the link is really gone
            raise TimeoutError(f"could not send {op!r} to the coordinator at {self.endpoint} within the timeout") from None
        self.sent_bytes += len(header) + sum(len(f) for f in frames)
        self._last_send = time.monotonic()

    def recv(self, timeout_s: float | None = None) -> tuple[dict, list]:
        """Next message; heartbeats while waiting; CoordinatorError on an `error` reply; TimeoutError."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply from the coordinator at {self.endpoint} within the timeout")
            if self.sock.poll(int(min(left, self.heartbeat_s) * 1000)):
                frames = self.sock.recv_multipart(copy=False)
                self.recv_bytes += sum(len(f.buffer) for f in frames)
                h = unpack_header(frames[0].buffer, REPLY_LIMITS)
                if (h["op"] == "error" and h.get("req") is None and h.get("reason") in self.unsolicited_errors):
                    # the answer to a heartbeat: the coordinator no longer knows us (it restarted)
                    raise CoordinatorError(h["reason"], h.get("detail", ""))
                if h["op"] in ("error", "welcome", "ack") and h.get("req") != self.req:
                    continue  # a reply to an earlier request or to a heartbeat (e.g. across a coordinator restart)
                if h["op"] == "error":
                    raise CoordinatorError(h.get("reason", "?"), h.get("detail", ""))
                return h, [f.buffer for f in frames[1:]]
            if time.monotonic() - self._last_send >= self.heartbeat_s:
                self.send("heartbeat")

    def close(self, leave: bool = True) -> None:
        if leave:
            try:
                self.send("leave")
            except (zmq.ZMQError, TimeoutError):
                pass  # nobody to tell: the coordinator will time us out
        self.sock.close(0)


def receive_weights(conn: "_Connection", numel: int) -> tuple[torch.Tensor, dict]:
    """Assemble a chunked `snapshot` (fp32, or bf16 from a relay) into a tensor; other messages arriving meanwhile are skipped
    (they predate the snapshot). Returns the weights and the last chunk's header (version, hash)."""
    out, version, assembler = None, None, None
    while True:
        h, frames = conn.recv()
        if h["op"] != "snapshot":
            continue
        if h["version"] != version:  # chunks of an earlier, interrupted snapshot: start over
            # a relay coordinator (coordinator/relay.py) sends its bf16 copy, a training one fp32
            out = torch.empty(numel, dtype=torch.bfloat16 if h.get("dtype") == "bfloat16" else torch.float32)
            version, assembler = h["version"], chunks.Assembler(chunks.raw_bytes(out))
        if assembler.add(h["index"], h["total"], h["offset"], frames[0]):
            return out, h


def _counts(h: dict, worker: str, rnd: int) -> bool:
    """Does this aggregate header count `worker`'s delta pushed for round `rnd` (on time or folded late)?"""
    return (h.get("round") == rnd and worker in h.get("contributors", ())) or [worker, rnd] in h.get("late", ())


class CoordinatorClient:
    """A trainer's link: join (seed, replay or snapshot), push a delta, receive the verified aggregate.

    `flat` is the worker's flat fp32 weights; `apply` and `load` write into the model (replays
    and snapshots during join; the caller applies the aggregates that `push` returns); `decay`
    multiplies flat ranges of the model's weights (`[(start, stop, factor)]`), needed only when
    the trainers use weight decay (an aggregate with decay and no `decay` callback is an error).
    """

    def __init__(self, endpoint: str, worker_id: str, timeout_s: float = 120.0, heartbeat_s: float = 1.0,
                 curve: tuple[str, str] | None = None, context: zmq.Context | None = None):
        self.conn = _Connection(endpoint, worker_id, "trainer", timeout_s, heartbeat_s, curve, context)
        self.version, self.hash, self.round, self.numel = 0, "", 0, 0
        self.counted: set[int] = set()  # join(pushed_since=...): rounds whose aggregate counts our push
        self.known_from = 0
        self._own: Decay = ()  # the decay of the outstanding push
        self._owed = False  # our weights carry `_own`, not yet matched by an aggregate we applied

    def join(self, fingerprint: str, flat: torch.Tensor, apply, load, decay=None, pushed_since: int | None = None) -> str:
        """Returns how the worker got in sync: 'seeded', 'in_sync', 'replayed' or 'snapshot'.
        `pushed_since`: also ask which of our pushes for rounds >= it were counted (a restart
        from a checkpoint); the answer lands in `counted` (set of rounds) and `known_from`."""
        self._rejoin_args = (fingerprint, apply, load, decay)
        how, _ = self._join(flat, pushed_since=pushed_since)
        return how

    def _decay(self, decay: Decay) -> None:
        """Apply an aggregate's decay to our weights, unless it is the one they already carry."""
        if not decay:
            return
        if self._owed:  # the first aggregate after our push's base: its round's decay is ours, applied locally
            if decay != self._own:
                raise CoordinatorError("decay_mismatch", f"round decayed by {decay_wire(decay)}, this trainer by "
                                       f"{decay_wire(self._own)}: lr / weight_decay / step differ between trainers")
            self._owed = False
            return
        fn = self._rejoin_args[3]
        if fn is None:
            raise CoordinatorError("decay_mismatch", "the coordinator's weights decay, but this client has no decay callback")
        fn(decay)

    def _join(self, flat: torch.Tensor, pending_round: int | None = None,
              pushed_since: int | None = None) -> tuple[str, memoryview | None]:
        """Join; with `pending_round`, a push for that round is outstanding: if a replayed aggregate
        already counts it, that replay is not applied here but returned, as the push's result
        (its decay already applied: the caller adds only the payload)."""
        fingerprint, apply, load, _ = self._rejoin_args
        self.numel = flat.numel()
        flat = flat.detach().to("cpu", torch.float32).contiguous()
        raw = chunks.raw_bytes(flat)
        if not self.hash:
            self.hash = genesis_hash(fingerprint, raw)
        deadline = time.monotonic() + self.conn.timeout_s
        while True:  # another trainer may still be seeding the weights: wait for it
            self.conn.send("join", role="trainer", fingerprint=fingerprint, numel=self.numel, version=self.version,
                           hash=self.hash, **({} if pushed_since is None else {"pushed_since": pushed_since}))
            try:
                h, _ = self._expect("welcome")
                if pushed_since is not None:
                    self.counted, self.known_from = set(h["counted"]), int(h["known_from"])
                break
            except CoordinatorError as e:
                if e.reason != "not_ready" or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        result = None
        if h["need_init"]:
            for where, chunk in chunks.split(raw):
                self.conn.send("init", chunk, **where)
            h, _ = self._expect("welcome")
            how = "seeded"
        elif h["need_sync"]:
            self.conn.send("sync", from_version=self.version)
            replayed, counted, before = [], False, (self.version, self.hash, self.round)
            try:
                while True:
                    hh, frames = self.conn.recv()
                    if hh["op"] == "synced":
                        break
                    if hh["op"] != "aggregate" or hh["version"] <= self.version:
                        continue  # stale: a broadcast or re-send from before we fell behind
                    decay = _decay_of(hh, self.numel)
                    replayed.append((self._verify(hh, frames), decay))
                    counted = counted or (pending_round is not None and _counts(hh, self.conn.worker, pending_round))
            except BaseException:  # nothing applied yet: stay at the version our weights are at
                self.version, self.hash, self.round = before
                raise
            if counted:  # our outstanding delta is in there: the last replay becomes the push's result
                replayed, (result, last_decay) = replayed[:-1], replayed[-1]
            for p, decay in replayed:
                self._decay(decay)
                apply(decode(p))
            if counted:
                self._decay(last_decay)
            h = hh
            how = "replayed"
        elif h["need_snapshot"]:
            if pending_round is not None:
                log.warning("rejoined by snapshot (coordinator at v%d, we were at v%d): cannot tell whether the "
                            "outstanding delta was applied; pushing it again", h["version"], self.version)
            self.conn.send("snapshot")
            weights, h = receive_weights(self.conn, self.numel)
            load(weights)  # the coordinator's weights, all its decays included
            self._owed = False
            how = "snapshot"
        else:
            how = "in_sync"
        self.version, self.hash, self.round = h["version"], h["hash"], h.get("round", self.round)
        return how, result

    def _expect(self, op: str) -> tuple[dict, list]:
        h, frames = self.conn.recv()
        if h["op"] != op:
            raise CoordinatorError("protocol", f"expected {op!r}, got {h['op']!r}")
        return h, frames

    def _verify(self, h: dict, frames: list) -> memoryview:
        """The aggregate's payload, once its version and hash chain (payload and decay) check out."""
        if h["op"] != "aggregate" or len(frames) != 1:
            raise CoordinatorError("protocol", f"expected an aggregate, got {h['op']!r}")
        if h["version"] != self.version + 1 or chain(self.hash, frames[0], _decay_of(h, self.numel)) != h["hash"]:
            raise CoordinatorError("hash_chain", f"aggregate v{h['version']} does not follow v{self.version} "
                                   f"({self.hash[:12]}): resync needed")
        self.version, self.hash, self.round = h["version"], h["hash"], h["round"] + 1
        return frames[0]

    def _await_aggregate(self) -> memoryview:
        """The next aggregate that follows our version (its decay accounted for); `ack`s and stale
        duplicates are skipped."""
        while True:
            h, frames = self.conn.recv()
            if h["op"] == "aggregate" and h["version"] > self.version:
                payload = self._verify(h, frames)
                self._decay(_decay_of(h, self.numel))
                return payload
            # "ack": our re-sent push is counted, its aggregate follows; older aggregates: duplicates

    def push(self, payload: bytes, step: int, get_flat=None, attempts: int = 4, decay: Decay = (),
             record=None) -> memoryview:
        """Send this worker's delta for the current round; return the round's verified aggregate payload.
        `decay`: the weight decay this worker applied to its weights since its previous push (it
        already did; the caller adds only the returned payload). `record(round)` is called
        before each send, with the round the push goes into (the outbox writes it down).

        Error feedback already counts the delta as sent, so it must be applied exactly once:
        after a timeout the same push is re-sent (idempotent on the coordinator); if the
        coordinator no longer knows us, we rejoin (`get_flat()` supplies the current weights),
        and either find the delta in a replayed aggregate or push it into the current round.
        """
        rnd, base = self.round, self.version
        self._own, self._owed = tuple(decay), bool(decay)
        resend_first, rejoin = True, False
        for attempt in range(attempts):
            try:
                if rejoin:
                    _, result = self._join(get_flat(), pending_round=rnd)
                    if result is not None:
                        return result  # the delta was already in an aggregate we had missed
                    rnd, base, rejoin = self.round, self.version, False  # not counted: push it into this round
                    if self._own and not self._owed:  # a replay or snapshot used up our local decay, but the
                        self._decay(self._own)         # coordinator applies it again in the round we push into
                        self._owed = True
                if record is not None:
                    record(rnd)
                self.conn.send("push", payload, round=rnd, step=step, base_version=base, decay=decay_wire(self._own))
                return self._await_aggregate()
            except (TimeoutError, CoordinatorError) as e:
                timeout = isinstance(e, TimeoutError)
                if not (timeout or e.reason in _REJOIN_REASONS) or get_flat is None or attempt == attempts - 1:
                    raise
                if timeout and resend_first and not rejoin:  # first the cheap, idempotent re-send on the same link
                    resend_first = False
                    continue
                resend_first, rejoin = True, True
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.conn.close()


class CoordinatorTransport:
    """ASPG's transport through the coordinator. `all_gather_bytes` returns [the aggregate]:
    the coordinator already averaged, and the mean of one message is itself, so the exchange
    (`apply_mean_`) only decodes and applies it. There is no dense collective: a dense exchange pushes
    the whole buffer as one (k = numel) delta."""

    world_size, rank = 1, 0

    def __init__(self, endpoint: str, worker_id: str, outbox: str | None = None, **client_kw):
        self.client = CoordinatorClient(endpoint, worker_id, **client_kw)
        # with `outbox` (a file beside the checkpoints), a restart from a checkpoint finds out which
        # pushes made after it were counted, and they leave the residual (outbox.py): none twice
        self.outbox = Outbox(outbox) if outbox else None
        self._delivered: list[SparseDelta] = []
        self.resume_report: dict | None = None
        self.params: list[torch.Tensor] = []
        self.how_joined = None
        self._step = 0
        self._sent = self._recv = 0
        self._decay_ops: tuple = ()  # ASPG's weight decay since the last push (set_decay)

    def bind(self, params: list[torch.Tensor], layout=None) -> None:
        """Called by ASPG: join with these parameters' flat weights (seed, replay or snapshot).
        `layout` (ASPG's FlatLayout, with its fp32 master copies) is where replayed aggregates and
        snapshots go, so a resync keeps masters and parameters in step."""
        from .pipeline import FlatLayout

        self.params = params
        self.layout = layout if layout is not None else FlatLayout(params)
        fp = model_fingerprint((str(i), p.shape, p.dtype) for i, p in enumerate(params))
        since = self.outbox.first_round() if self.outbox is not None else None
        self.how_joined = self.client.join(fp, self._flat(), self._apply, self._load, self._decay, pushed_since=since)

    def set_decay(self, ops) -> None:
        """Called by ASPG before each exchange: the weight decay it applied since the last one."""
        self._decay_ops = tuple((int(a), int(b), float(f)) for a, b, f in ops)

    def _decay(self, ops) -> None:
        """W[start:stop] *= factor on the parameters (through their fp32 masters), as ASPG does it."""
        for start, stop, factor in ops:
            for p, m, off in zip(self.layout.params, self.layout.masters, self.layout.offsets):
                lo, hi = max(start, off), min(stop, off + p.numel())
                if lo >= hi:
                    continue
                if m is None:
                    p.data.view(-1)[lo - off:hi - off].mul_(factor)
                else:
                    m.view(-1)[lo - off:hi - off].mul_(factor)
                    p.data.view(-1)[lo - off:hi - off] = m.view(-1)[lo - off:hi - off].to(p.dtype)

    def _flat(self) -> torch.Tensor:
        return self.layout.flatten().cpu()

    def _apply(self, d: SparseDelta) -> None:
        self.layout.add_sparse(d, 1.0)

    def _load(self, flat: torch.Tensor) -> None:
        for p, m, view in zip(self.layout.params, self.layout.masters, self.layout.views(flat)):
            p.data.copy_(view)
            if m is not None:
                m.copy_(view)

    def all_gather_bytes(self, payload: bytes) -> list[memoryview]:
        s0, r0 = self.client.conn.sent_bytes, self.client.conn.recv_bytes
        self._step += 1
        agg = self._push(payload)
        self._sent = self.client.conn.sent_bytes - s0  # our push, headers included
        self._recv = self.client.conn.recv_bytes - r0  # the aggregate
        return [agg]

    def all_reduce_mean_(self, flat: torch.Tensor) -> None:
        from ..codec import encode

        full = SparseDelta(torch.arange(flat.numel()), flat.detach().float().cpu().clone(), (flat.numel(),))
        s0, r0 = self.client.conn.sent_bytes, self.client.conn.recv_bytes
        self._step += 1
        agg = decode(self._push(encode(full, "auto", "fp32")))
        self._sent, self._recv = self.client.conn.sent_bytes - s0, self.client.conn.recv_bytes - r0
        flat.zero_()
        flat[agg.indices.to(flat.device)] = agg.values.to(flat.device)

    def _push(self, payload: bytes) -> memoryview:
        step, box = self._step, self.outbox
        record = None if box is None else (lambda rnd: box.append(step, rnd, payload))
        return self.client.push(payload, step, self._flat, decay=self._decay_ops, record=record)

    def wire_bytes(self, sizes) -> tuple[int, int]:
        return self._sent, self._recv

    def state_dict(self) -> dict:
        """What a checkpoint needs: the push counter. Versions and hashes come from the coordinator at
        join. Call it when checkpointing: the outbox then knows the checkpoint holds this step."""
        if self.outbox is not None:
            self.outbox.checkpointed(self._step)
        return {"step": self._step}

    def load_state_dict(self, state: dict) -> None:
        """Resume from a checkpoint's state (after `bind`, whose join asked the coordinator about our
        outbox): the deltas pushed after that checkpoint and counted go to `take_delivered()`."""
        self._step = int(state["step"])
        if self.outbox is None:
            return
        counted, unknown, again = [], [], []
        for rnd, payload in self.outbox.since(self._step):
            # a round older than every retained aggregate closed long ago, almost surely with our
            # push in it (rounds close on the pushes that arrived): assumed counted, and said so
            fate = counted if rnd in self.client.counted else unknown if rnd < self.client.known_from else again
            fate.append(rnd)
            if fate is not again:
                self._delivered.append(decode(payload))
        if unknown:
            log.warning("outbox: pushes for rounds %s are older than the coordinator retains (from round %d): "
                        "assumed counted; raise the coordinator's --retain above the checkpoint interval",
                        unknown, self.client.known_from)
        self.resume_report = {"after_step": self._step, "counted_rounds": counted, "assumed_counted_rounds": unknown,
                              "not_counted_rounds": again}
        log.info("resume from step %d: pushes since counted in rounds %s (leave the residual), not counted in %s "
                 "(sent again)", self._step, counted + unknown, again)

    def take_delivered(self) -> list[SparseDelta]:
        """The deltas a restart found already counted by the coordinator, once: ASPG removes them from
        its residual, as the process that pushed them did when their aggregate arrived."""
        out, self._delivered = self._delivered, []
        return out

    def max_over_ranks(self, value: float) -> float:
        return value

    def close(self) -> None:
        self.client.close()


class RolloutClient:
    """Keeps an inference copy in sync: a snapshot on join, then every aggregate's changes.

    With the coordinator's default (`rollout_bf16`), it receives exactly the bf16 entries whose
    bits changed and stores them: its bf16 weights equal bf16(coordinator's fp32 weights), bit
    for bit, after every version. Anchors (full copies) replace the weights when they arrive.
    If the coordinator restarted (it answers our heartbeats with `unknown_worker`), `poll` raises
    `CoordinatorError("unknown_worker")`: call `connect()` again for a fresh snapshot.
    """

    def __init__(self, endpoint: str, worker_id: str, fingerprint: str, numel: int, timeout_s: float = 60.0,
                 heartbeat_s: float = 1.0, curve: tuple[str, str] | None = None, context: zmq.Context | None = None):
        self.conn = _Connection(endpoint, worker_id, "rollout", timeout_s, heartbeat_s, curve, context)
        self.conn.unsolicited_errors = ("unknown_worker",)  # the coordinator restarted: poll raises, connect() again
        self.fingerprint, self.numel = fingerprint, numel
        self.weights = torch.zeros(numel, dtype=torch.bfloat16)
        self.version, self.hash, self.updates = -1, "", 0
        self._anchor: tuple | None = None  # (version, buffer, chunks.Assembler) of an anchor in flight

    def connect(self, wait_s: float = 0.0) -> None:
        """Join and take a snapshot. `wait_s`: keep asking that long while the coordinator has no weights
        yet (`not_ready`: a relay before every rank's first patch, a training coordinator before W0)."""
        deadline = time.monotonic() + wait_s
        while True:
            self.conn.send("join", role="rollout", fingerprint=self.fingerprint, numel=self.numel, version=0, hash="")
            try:
                h, _ = self.conn.recv()
                break
            except CoordinatorError as e:
                if e.reason != "not_ready" or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        if h["op"] != "welcome":
            raise CoordinatorError("protocol", f"expected welcome, got {h['op']!r}")
        self.conn.send("snapshot")
        weights, h = receive_weights(self.conn, self.numel)
        self.weights = weights.to(torch.bfloat16)
        self.version, self.hash = h["version"], h["hash"]

    def poll(self, timeout_s: float = 0.0) -> int:
        """Apply whatever arrived (waiting up to timeout_s for the first message); return how many."""
        n = 0
        wait = timeout_s
        while True:
            try:
                h, frames = self.conn.recv(timeout_s=max(wait, 1e-3))
            except TimeoutError:
                return n
            wait = 0.0
            if h["op"] == "rollout":
                if h["version"] <= self.version:
                    continue  # already covered by the snapshot
                if h["version"] != self.version + 1:
                    raise CoordinatorError("gap", f"rollout v{h['version']} after v{self.version}: reconnect for a snapshot")
                d = decode(frames[0])
                if h["kind"] == "bf16_values":
                    self.weights[d.indices] = d.values.to(torch.bfloat16)  # decayed values included
                else:
                    w = self.weights.float()
                    for start, stop, factor in _decay_of(h, self.numel):
                        w[start:stop].mul_(factor)
                    d.add_to(w)
                    self.weights = w.to(torch.bfloat16)
                self.version, self.hash = h["version"], h["hash"]
                self.updates += 1
                n += 1
            elif h["op"] == "anchor":
                self._on_anchor(h, frames[0])

    def _on_anchor(self, h: dict, chunk) -> None:
        if self._anchor is None or self._anchor[0] != h["version"]:
            buf = torch.empty(self.numel, dtype=torch.bfloat16 if h["dtype"] == "bfloat16" else torch.float32)
            self._anchor = (h["version"], buf, chunks.Assembler(chunks.raw_bytes(buf)))
        _, buf, assembler = self._anchor
        if assembler.add(h["index"], h["total"], h["offset"], chunk):
            self.weights = buf.to(torch.bfloat16)
            self._anchor = None

    def close(self) -> None:
        self.conn.close()


class PublisherClient:
    """A ZeRO-3 rank's link to a relay coordinator (coordinator/relay.py): `join` once, then one
    `send(payload, version, rank)` per version (the `send` of `Zero3RolloutPublisher`).

    Each patch waits for its `ack`, so a refusal (bad partition, layout, sequence) is raised at the
    rank that caused it, and a rank that runs `relay_max_ahead` versions ahead of the slowest one
    waits (`not_ready` is retried with a back-off up to `timeout_s`) instead of growing the relay's
    memory. `join` returns the relay's next version; if the relay no longer knows us (it restarted),
    `send` raises `CoordinatorError("unknown_worker")`: rejoin and re-anchor.
    """

    def __init__(self, endpoint: str, worker_id: str, timeout_s: float = 60.0, heartbeat_s: float = 1.0,
                 curve: tuple[str, str] | None = None, context: zmq.Context | None = None):
        self.conn = _Connection(endpoint, worker_id, "publisher", timeout_s, heartbeat_s, curve, context)
        self.conn.unsolicited_errors = ("unknown_worker",)
        self.timeout_s = timeout_s

    def join(self, fingerprint: str, numel: int, rank: int, ranks: int) -> int:
        """Join as publisher `rank` of `ranks`; returns the relay's next version (its last complete + 1)."""
        self._joined_as = (fingerprint, numel, rank, ranks)
        self.conn.send("join", role="publisher", fingerprint=fingerprint, numel=numel, version=0, hash="",
                       rank=rank, ranks=ranks)
        h, _ = self.conn.recv()
        if h["op"] != "welcome":
            raise CoordinatorError("protocol", f"expected welcome, got {h['op']!r}")
        return int(h["next_version"])

    def rejoin(self) -> int:
        """Join again as before (the relay restarted or dropped us); returns its next version."""
        return self.join(*self._joined_as)

    def __call__(self, payload: bytes, version: int, rank: int) -> None:
        deadline, backoff = time.monotonic() + self.timeout_s, 0.01
        while True:
            self.conn.send("patch", payload, version=version)
            try:
                h, _ = self.conn.recv()
            except CoordinatorError as e:
                if e.reason != "not_ready" or time.monotonic() > deadline:
                    raise
                time.sleep(backoff)  # ahead of the slowest rank: let it catch up
                backoff = min(1.0, 2 * backoff)
                continue
            if h["op"] != "ack" or h.get("version") != version:
                raise CoordinatorError("protocol", f"expected the ack of patch {version}, got {h}")
            return

    def close(self) -> None:
        self.conn.close()
