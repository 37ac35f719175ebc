"""Relay mode: ZeRO-3 ranks publish patches of their own parameter partitions; the coordinator
assembles each version from every rank's patch and streams it to rollout workers, so no training
rank ever gathers the full model (`sparsecomm coordinator --relay`).

    publisher r (a ZeRO-3 rank)  --patch{version v}-->  coordinator  --rollout{v}-->  rollout workers
        changed bf16 entries of its partition            version v = every rank's patch v applied

A patch is `codec.encode_model` of every parameter (same names, shapes and order on every rank,
what `Zero3RolloutPublisher.patch` writes): exact bf16 values at flat indices into that tensor.
Values are absolute, not deltas, so a full-partition patch is always a valid patch; that is how a
publisher starts and how it rejoins after a restart (an "anchor"). What the relay checks:

- membership: the first publisher to join fixes the world size, the fingerprint and numel (at most
  `relay_max_numel`); rollout workers join once version 1 exists; if every publisher leaves before
  version 1, all of it is forgotten (a stray join cannot lock the real job out);
- layout: the first accepted patch fixes the tensor names and shapes; their fingerprint
  (`layout_fingerprint`, what rollout workers pass to `RolloutClient`) must be the publishers', and
  every later patch must list exactly those tensors; only then is the bf16 copy allocated;
- ownership: rank r of P owns ZeRO-3's partition of each tensor, [r*ceil(n/P), (r+1)*ceil(n/P)) cut at
  n (`partition`); its anchor (first patch since it joined) must cover exactly that, every later
  patch stay inside it, so a rank cannot write another's entries and a version's entries are disjoint;
- values: finite bf16 (NaN and infinity refused before anything is kept);
- order: a rank's patches come for versions V+1, V+2, ... (V: the last complete version), at most
  `relay_max_ahead` beyond V (`not_ready` beyond: the publisher waits); a patch out of sequence is
  refused. Nothing of a refused patch is kept.

Version v is published when all ranks have sent patch v: the relay's bf16 copy takes each rank's
entries, rollout workers get one `rollout` message of kind `bf16_values` with the flat indices
(layout offset + index) and values, and the chain moves on: hash_v = sha256(hash_{v-1} || that
payload), hash_0 = sha256(fingerprint || "zeros"). A rollout worker that joins gets the relay's bf16
copy (`snapshot`, dtype bfloat16); `anchor_every` works as in training mode. Publishers are never
timed out (a version cannot complete without them anyway). An acknowledged patch stays until its
version completes, also after its publisher leaves; one that (re)joins is told V and re-anchors at
V+1, and its patches beyond V that had not completed are dropped (`Zero3RolloutPublisher.publish`
re-anchors every rank together, so a version never mixes ranks' training steps). The relay keeps no
checkpoint: after a restart the publishers re-anchor, and rollout workers, whose heartbeats are then
answered `unknown_worker`, get `CoordinatorError("unknown_worker")` from `poll` and reconnect.
Limits: an anchor is one message (at most `max_frame_bytes`, ~500M bf16 entries per rank by default),
and the relay holds each pending patch decoded (int64 indices + bf16 values, ~10 B per entry: about
10 B per parameter while version 1's anchors are in flight).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch

from ...codec import CodecError, Limits, decode_model, encode
from ...delta import SparseDelta
from ..protocol import ProtocolError, chain, field as hfield, pack
from .rollout import send_tensor, send_version
from .state import State


def layout_fingerprint(named_shapes) -> str:
    """The relay's model fingerprint: sha256 over (name, shape) of every tensor, in order. A rollout
    worker computes it from its own model (`[(n, p.shape) for n, p in model.named_parameters()]`);
    a ZeRO-3 rank from `p.ds_shape`."""
    h = hashlib.sha256()
    for name, shape in named_shapes:  # length-prefixed: no two layouts give the same byte string
        h.update(f"{len(name)}:{name}:{tuple(int(s) for s in shape)};".encode())
    return "layout-" + h.hexdigest()[:32]


@dataclass
class _Rank:
    pending: dict[int, list[SparseDelta]] = field(default_factory=dict)  # version -> per-tensor patch
    anchored_at: int = 0  # the version of its latest anchor (0: none since it joined)


def partition(numel: int, ranks: int, rank: int) -> tuple[int, int]:
    """ZeRO-3's partition of a tensor of `numel` entries: rank r holds [r*ceil(n/P), (r+1)*ceil(n/P)), cut
    at n (DeepSpeed pads the tensor to a multiple of P and splits it evenly; the padding is never sent)."""
    part = -(-numel // ranks)
    return min(numel, rank * part), min(numel, rank * part + part)


class PatchRelay:
    """The relay's state and its two requests: a publisher's join and its patch."""

    def __init__(self, cfg, state: State, metrics, send, rollout_peers):
        self.cfg, self.state, self.metrics, self.send = cfg, state, metrics, send
        self.rollout_peers = rollout_peers  # () -> the server's in-sync rollout peers
        self.limits = Limits(max_header_bytes=1 << 20, max_tensors=1 << 14, max_ndim=8, max_name_chars=256,
                             max_body_bytes=cfg.max_frame_bytes)
        self.published_bytes = 0
        self._reset()

    def _reset(self) -> None:
        """No publisher and no version yet: whatever the first publisher fixed (world size, fingerprint,
        numel, layout) is forgotten, so a stray or wrong join cannot lock the real job out."""
        self.ranks: int | None = None  # publishers per version, fixed by the first publisher's join
        self.names: list[str] | None = None
        self.shapes: list[tuple[int, ...]] | None = None
        self.offsets: list[int] | None = None  # flat offset of each tensor in the rollout layout
        self.by_rank: dict[int, _Rank] = {}
        self.rank_of: dict[str, int] = {}  # publisher worker id -> its rank
        self.first_seen: dict[int, float] = {}  # version -> monotonic time of its first patch
        self.state.fingerprint, self.state.numel, self.state.weights, self.state.hash = None, 0, None, ""

    # ------------------------------------------------------------------ membership
    def join(self, worker: str, h: dict, fingerprint: str, numel: int) -> dict:
        """A publisher joins (or rejoins): the first one fixes world size, fingerprint and numel (the server
        has checked them against what is fixed); returns welcome fields. Nothing is allocated here (the bf16
        copy is, once the first patch's layout matches)."""
        ranks = hfield(h, "ranks", int, 1, 1 << 16)
        rank = hfield(h, "rank", int, 0, ranks - 1)
        if numel > self.cfg.relay_max_numel:
            raise ProtocolError("value_out_of_range", f"numel {numel} exceeds relay_max_numel {self.cfg.relay_max_numel}")
        st = self.state
        if self.ranks is not None and ranks != self.ranks:
            raise ProtocolError("bad_field", f"ranks={ranks}, but this relay assembles versions from {self.ranks} ranks")
        other = next((w for w, r in self.rank_of.items() if r == rank and w != worker), None)
        if other is not None:
            raise ProtocolError("duplicate", f"rank {rank} is already published by worker {other!r}")
        st.fingerprint, st.numel, self.ranks = fingerprint, numel, ranks
        self.rank_of[worker] = rank
        r = self.by_rank.setdefault(rank, _Rank())
        r.pending.clear()  # a rejoin: what it sent beyond the last complete version never completed
        r.anchored_at = 0  # it must re-anchor (its first patch covers its whole partition again)
        return {"next_version": st.version + 1}

    def drop(self, worker: str) -> None:
        """A publisher left: its acknowledged patches stay (a rank that sent its last version and closed
        must not undo it); whoever joins as that rank next starts over from its anchor. Once no publisher
        is left before any version completed, the relay forgets what they fixed."""
        self.rank_of.pop(worker, None)
        if not self.rank_of and self.state.version == 0:
            self._reset()

    # ------------------------------------------------------------------ patches
    def _layout(self, patch: dict[str, SparseDelta]) -> tuple[list[str], list[tuple[int, ...]], list[int]]:
        """(names, shapes, offsets) of the first patch, checked against what the publishers joined with."""
        names = list(patch)
        shapes = [tuple(d.shape) for d in patch.values()]
        fp = layout_fingerprint(zip(names, shapes))
        if fp != self.state.fingerprint:
            raise ProtocolError("fingerprint", f"the patch's tensors have layout fingerprint {fp}, the publishers "
                                               f"joined with {self.state.fingerprint}")
        numels = [int(torch.Size(s).numel()) for s in shapes]
        if sum(numels) != self.state.numel:
            raise ProtocolError("shape_mismatch", f"the patch's tensors hold {sum(numels)} entries, the publishers "
                                                  f"joined with numel {self.state.numel}")
        offsets = [0]
        for n in numels[:-1]:
            offsets.append(offsets[-1] + n)
        return names, shapes, offsets

    def _check(self, rank: int, r: _Rank, patch: dict[str, SparseDelta], names, shapes) -> list[SparseDelta]:
        """The patch as a per-tensor list, checked against the layout and the rank's ZeRO-3 partition:
        an anchor (its first patch since it joined) must cover its partition exactly, a later patch
        stay inside it. Values must be finite bf16."""
        if list(patch) != names or [tuple(d.shape) for d in patch.values()] != shapes:
            raise ProtocolError("shape_mismatch", "the patch's tensors (names, shapes, order) differ from the layout "
                                                  "fixed by the first patch")
        deltas = list(patch.values())
        for name, shape, d in zip(names, shapes, deltas):
            if d.dtype != torch.bfloat16:
                raise ProtocolError("bad_payload", f"tensor {name!r} is {d.dtype}: relay patches carry bf16 tensors")
            if d.k and not bool(torch.isfinite(d.values).all()):
                raise ProtocolError("value_out_of_range", f"tensor {name!r}: NaN or infinity in rank {rank}'s patch")
            lo, hi = partition(int(torch.Size(shape).numel()), self.ranks, rank)
            if r.anchored_at == 0:  # strictly increasing indices (the codec checks): k, first and last pin them
                if d.k != hi - lo or (d.k and (int(d.indices[0]) != lo or int(d.indices[-1]) != hi - 1)):
                    raise ProtocolError("bad_payload", f"rank {rank}'s first patch must cover exactly its partition "
                                                       f"[{lo}, {hi}) of {name!r}")
            elif d.k and (int(d.indices[0]) < lo or int(d.indices[-1]) >= hi):
                raise ProtocolError("bad_payload", f"rank {rank}'s patch of {name!r} writes outside its partition "
                                                   f"[{lo}, {hi})")
        return deltas

    def patch(self, worker: str, h: dict, frames) -> dict:
        """A publisher's patch for one version; returns ack fields. Nothing is kept if it is refused."""
        rank = self.rank_of.get(worker)
        if rank is None:
            raise ProtocolError("unknown_worker", f"worker {worker!r} has not joined as a publisher")
        r = self.by_rank[rank]
        version = hfield(h, "version", int, 1, 1 << 62)
        expected = self.state.version + 1 + len(r.pending)  # pending is contiguous: V+1 .. V+len
        if version != expected:
            raise ProtocolError("stale", f"rank {rank}: patch for version {version}, expected {expected} (relay at "
                                         f"version {self.state.version}, {len(r.pending)} of its patches pending)")
        if len(r.pending) >= self.cfg.relay_max_ahead:
            raise ProtocolError("not_ready", f"rank {rank} is {len(r.pending)} versions ahead of the slowest rank "
                                             f"(relay_max_ahead {self.cfg.relay_max_ahead}): wait for its ack")
        if len(frames) != 1:
            raise ProtocolError("malformed", f"patch carries {len(frames)} frames, expected 1")
        try:
            patch = decode_model(frames[0], self.limits)
        except CodecError as e:
            raise ProtocolError("bad_payload", str(e)) from None
        layout = (self.names, self.shapes, self.offsets) if self.names is not None else self._layout(patch)
        deltas = self._check(rank, r, patch, layout[0], layout[1])
        if self.state.weights is None:  # the first accepted patch: the layout is committed with the bf16 copy
            try:
                weights = torch.zeros(self.state.numel, dtype=torch.bfloat16)
            except RuntimeError as e:
                raise ProtocolError("value_out_of_range", f"cannot hold a bf16 copy of {self.state.numel} entries: "
                                                          f"{e}") from None
            self.names, self.shapes, self.offsets = layout
            self.state.weights = weights
            self.state.hash = hashlib.sha256(self.state.fingerprint.encode() + b"zeros").hexdigest()
        if r.anchored_at == 0:
            r.anchored_at = version
        r.pending[version] = deltas
        self.first_seen.setdefault(version, time.monotonic())
        self._maybe_complete()
        return {"version": version, "relay_version": self.state.version}

    # ------------------------------------------------------------------ versions
    def _maybe_complete(self) -> None:
        while self.ranks is not None and len(self.by_rank) == self.ranks:
            v = self.state.version + 1
            if not all(v in r.pending for r in self.by_rank.values()):
                return
            idx, vals = [], []
            for i, off in enumerate(self.offsets):  # tensor by tensor, rank by rank: sorted flat indices
                for rank in sorted(self.by_rank):  # ZeRO-3 partitions are in rank order (partition())
                    d = self.by_rank[rank].pending[v][i]
                    if d.k:
                        idx.append(d.indices.to(torch.int64) + off)
                        vals.append(d.values)
            flat_idx = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)
            flat_val = torch.cat(vals) if vals else torch.zeros(0, dtype=torch.bfloat16)
            w = self.state.weights
            changed = flat_val.view(torch.int16) != w[flat_idx].view(torch.int16)  # only what changes goes out
            flat_idx, flat_val = flat_idx[changed], flat_val[changed]
            # encoded before anything changes (every value was checked finite when its patch came in)
            payload = encode(SparseDelta(flat_idx, flat_val, (self.state.numel,), torch.bfloat16), "auto", "bf16")
            w[flat_idx] = flat_val
            for r in self.by_rank.values():
                del r.pending[v]
            self.state.version, self.state.hash = v, chain(self.state.hash, payload)
            self.metrics.version.set(v)
            self.metrics.rounds.inc()
            self.metrics.latency.observe(time.monotonic() - self.first_seen.pop(v, time.monotonic()))
            self._publish(payload)

    def _publish(self, payload: bytes) -> None:
        st = self.state
        header = pack("rollout", version=st.version, hash=st.hash, kind="bf16_values", decay=[])
        self.published_bytes += send_version(self.send, self.rollout_peers(), st.version, header, payload,
                                             self.cfg.anchor_every, lambda identity: self.send_snapshot(identity, "anchor"))

    def send_snapshot(self, identity: bytes, op: str = "snapshot") -> None:
        if self.state.version == 0:
            raise ProtocolError("not_ready", "the relay has no complete version yet (waiting for every rank's anchor)")
        send_tensor(self.send, identity, op, self.state, self.state.weights, dtype="bfloat16")
