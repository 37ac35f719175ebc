"""The coordinator protocol (version 2): a msgpack header frame plus raw binary frames. No pickle.

Every message is a ZeroMQ multipart message `[header, *frames]` (the ROUTER side also sees the
peer identity first). `header` is a msgpack map with at least {"v": 2, "op": str}; frames hold
the codec's payloads (sparsecomm.codec wire format) or raw little-endian weight chunks
(chunks.py: {index, total, offset}, at most CHUNK_BYTES each).

Client -> coordinator
    join        {worker, role: "trainer"|"rollout"|"publisher", fingerprint, numel, version, hash, [pushed_since],
                [rank, ranks] (publishers)}
                pushed_since: a trainer restarted from a checkpoint asks which of its pushes for
                rounds >= pushed_since were counted (its outbox, zmq_client.py): see welcome
    init        {worker, index, total, offset}            + fp32 chunk   (first trainer seeds W0)
    push        {worker, round, step, base_version, decay} + delta payload (flat, shape (numel,))
                decay: [[start, stop, factor], ...] the decoupled weight decay this trainer applied
                to its weights since its last push, in order (W[start:stop] *= factor, one entry
                per param group and local step; [] without weight decay). Every contributor of a
                round must send the same list (refused as `decay_mismatch` otherwise).
    heartbeat   {worker}
    sync        {worker, from_version}                    missing aggregates, or snapshot needed
    snapshot    {worker}                                  full weights, chunked
    leave       {worker}
    patch       {worker, version}                         + encode_model payload (relay mode only:
                a ZeRO-3 rank's exact bf16 entries of its own partition for that version, see
                coordinator/relay.py; a publisher joins with role "publisher" and {rank, ranks})

Coordinator -> client
    welcome     {version, hash, round, numel, need_init, need_sync, need_snapshot, [counted, known_from]}
                counted: the rounds >= pushed_since whose aggregate counts (or will count) this
                trainer's push; a round before known_from is older than every retained aggregate
    aggregate   {round, version, hash, parent_hash, contributors, late, decay} + payload
                contributors: workers whose on-time deltas it averages; late: [[worker, round], ...]
                whose late deltas were folded in. Together they name every delta in the mean.
                decay: the round's agreed weight decay; the version it produces is
                W_v = decay(W_{v-1}) + decode(payload), on the coordinator and on every replica.
    ack         {round, status: "pending"}  a re-sent push already counted; its aggregate follows
                (relay mode: {version, relay_version} for every accepted patch)
    rollout     {version, hash, kind: "bf16_values"|"delta", decay}              + payload
                (decay only matters for kind "delta": bf16_values already carry decayed values)
    anchor      {version, hash, index, total, offset, dtype}                    + chunk
    snapshot    {version, hash, round, index, total, offset, [dtype]}           + fp32 chunk
                (relay mode: dtype "bfloat16", the relay's bf16 copy)
    synced      {version, hash, count}  (after count `aggregate` replays)
    error       {reason, detail}        reason is one of REASONS (counted by the coordinator)

Requests (join, init, push, sync, snapshot) may carry an integer "req"; `welcome`, `ack` and
`error` replies echo it, so a client that retried after a coordinator restart can ignore stale
replies. A push is idempotent: re-sent for a round whose aggregate exists and counts it, the
reply is that same aggregate; re-sent while its round is open, the reply is `ack`.

Versions: the coordinator's weights version counts applied aggregates; `hash` chains them:
hash_v = sha256(hash_{v-1} || aggregate payload bytes [|| "decay" || msgpack(decay) when decay is
not empty]), hash_0 = sha256(fingerprint || W0 bytes). A worker that applies the same payloads
and decays reaches the same hash, and can prove it. Version 2 added `decay` (the coordinator's
canonical weights decay with the trainers', so snapshots and rollout copies match them).

Size limits are checked before anything is unpacked (HeaderLimits): a request header is at
most 4 KiB with short strings and arrays, so a msgpack "bomb" (a few bytes per nested object,
~70 bytes of Python object each) is refused by its length prefix or by msgpack's own
per-container limits, before it is materialised.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import msgpack

PROTOCOL_VERSION = 2  # 2: push/aggregate `decay` (weight decay on the coordinator's weights)
OPS_IN = ("join", "init", "push", "heartbeat", "sync", "snapshot", "leave", "patch")
ROLES = ("trainer", "rollout", "publisher")
REASONS = ("malformed", "protocol_version", "unknown_op", "unknown_worker", "bad_field", "fingerprint",
           "shape_mismatch", "bad_payload", "value_out_of_range", "oversized", "duplicate", "stale", "not_ready",
           "init_conflict", "forbidden", "rate_limited", "decay_mismatch", "internal")
MAX_DECAY_OPS = 64  # param groups x local steps per push; a header of 64 ops is ~1.8 KiB


@dataclass(frozen=True)
class HeaderLimits:
    """Bounds on a header, enforced before (length) and while (msgpack's per-container limits) unpacking."""

    max_bytes: int
    max_str_len: int
    max_array_len: int
    max_map_len: int


# What clients send is small and flat (the largest, `join`, is ~250 bytes): tight bounds.
REQUEST_LIMITS = HeaderLimits(max_bytes=4096, max_str_len=512, max_array_len=MAX_DECAY_OPS, max_map_len=32)
# Coordinator replies list contributors (one name per trainer): looser, and they come from the server.
REPLY_LIMITS = HeaderLimits(max_bytes=1 << 20, max_str_len=4096, max_array_len=1 << 16, max_map_len=64)


class ProtocolError(ValueError):
    """A message that breaks the protocol; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def pack(op: str, **fields) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, "op": op, **fields})


def unpack_header(raw, limits: HeaderLimits = REQUEST_LIMITS) -> dict:
    """The header map of a message, validated; `raw` may be a buffer (its length is checked first)."""
    if len(raw) > limits.max_bytes:
        raise ProtocolError("oversized", f"header of {len(raw)} bytes (limit {limits.max_bytes})")
    try:
        h = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0,
                            max_str_len=limits.max_str_len, max_array_len=limits.max_array_len,
                            max_map_len=limits.max_map_len)
    except Exception as e:  # msgpack raises several unrelated exception types
        raise ProtocolError("malformed", f"header is not msgpack ({type(e).__name__})") from None
    if not isinstance(h, dict):
        raise ProtocolError("malformed", "header is not a map")
    if h.get("v") != PROTOCOL_VERSION:
        raise ProtocolError("protocol_version", f"protocol version {h.get('v')!r}, this coordinator speaks {PROTOCOL_VERSION}")
    if not isinstance(h.get("op"), str):
        raise ProtocolError("malformed", "missing op")
    return h


def field(h: dict, key: str, kind: type, lo: int | None = None, hi: int | None = None, allow_empty: bool = False):
    """h[key] checked for type (bool is not an int here) and integer range."""
    v = h.get(key)
    if kind is int:
        if type(v) is not int or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ProtocolError("bad_field", f"{key}={v!r} is not an int in [{lo}, {hi}]")
    elif not isinstance(v, kind):
        raise ProtocolError("bad_field", f"{key}={v!r} is not {kind.__name__}")
    if kind is str and not (0 if allow_empty else 1) <= len(v) <= 256:
        raise ProtocolError("bad_field", f"{key} must be {0 if allow_empty else 1}..256 characters")
    return v


Decay = tuple[tuple[int, int, float], ...]  # ((start, stop, factor), ...): W[start:stop] *= factor, in order


def decay_field(h: dict, numel: int) -> Decay:
    """h["decay"] validated: at most MAX_DECAY_OPS [start, stop, factor] with 0 <= start < stop <= numel
    and a finite factor in (0, 1] (a decoupled decay 1 - lr*wd; anything else is a bug or a lie)."""
    ops = h.get("decay", [])
    if not isinstance(ops, list) or len(ops) > MAX_DECAY_OPS:
        raise ProtocolError("bad_field", f"decay must be a list of at most {MAX_DECAY_OPS} [start, stop, factor]")
    out = []
    for op in ops:
        if not (isinstance(op, list) and len(op) == 3 and type(op[0]) is int and type(op[1]) is int
                and type(op[2]) is float):
            raise ProtocolError("bad_field", f"decay entry {op!r} is not [int, int, float]")
        start, stop, factor = op
        if not (0 <= start < stop <= numel) or not (0.0 < factor <= 1.0):  # also refuses NaN
            raise ProtocolError("bad_field", f"decay entry {op!r}: need 0 <= start < stop <= {numel}, 0 < factor <= 1")
        out.append((start, stop, factor))
    return tuple(out)


def decay_wire(decay: Decay) -> list:
    return [[int(a), int(b), float(f)] for a, b, f in decay]


def chain(prev_hash: str, payload: bytes | memoryview, decay: Decay = ()) -> str:
    h = hashlib.sha256(bytes.fromhex(prev_hash))
    h.update(memoryview(payload).cast("B"))
    if decay:  # the decay is part of what produced the version: the chain commits to it
        h.update(b"decay" + msgpack.packb(decay_wire(decay)))
    return h.hexdigest()


def apply_decay(flat, decay: Decay) -> None:
    """W[start:stop] *= factor for each op, in order: the same fp32 multiply the trainers' ASPG does
    (a Python-float scalar on an fp32 tensor), so the results agree bit for bit."""
    for start, stop, factor in decay:
        flat[start:stop].mul_(factor)


def genesis_hash(fingerprint: str, weights_bytes) -> str:
    h = hashlib.sha256(fingerprint.encode())
    h.update(memoryview(weights_bytes).cast("B"))  # incremental: no copy of the weights
    return h.hexdigest()


def model_fingerprint(named_shapes) -> str:
    """sha256 over (name, shape, dtype) of every parameter, in order: two workers share a model iff equal."""
    h = hashlib.sha256()
    for name, shape, dtype in named_shapes:
        h.update(f"{name}:{tuple(shape)}:{dtype};".encode())
    return h.hexdigest()[:32]
