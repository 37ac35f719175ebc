"""Relay mode: ZeRO-3 ranks publish patches of their own parameter partitions; the coordinator
assembles each version from every rank's patch and streams it to rollout workers, so no training
rank ever gathers the full model (`sparsecomm coordinator --relay`).

    publisher r (a ZeRO-3 rank)  --patch{version v}-->  coordinator  --rollout{v}-->  rollout workers
        changed bf16 entries of its partition            version v = every rank's patch v applied

A patch is `codec.encode_model` of every parameter (same names, shapes and order on every rank,
what `Zero3RolloutPublisher.patch` writes): exact bf16 values at flat indices into that tensor.
Values are absolute, not deltas, so a full-partition patch is always a valid patch; that is how a
publisher starts and how it rejoins after a restart (an "anchor"). What the relay checks:

- layout: the first patch fixes the tensor names and shapes; their fingerprint
  (`layout_fingerprint`, what rollout workers pass to `RolloutClient`) must be the one every
  peer joined with, and every later patch must list exactly those tensors;
- ownership: a rank's anchor must be one contiguous range per tensor, and ranges of different
  ranks may not overlap; every later patch of that rank stays inside its ranges, so a rank that
  lies about another's entries is refused, and ranks' entries within a version are disjoint;
- completeness: version 1 is published only once the anchors cover every entry of every tensor;
- order: a rank's patches come for versions V+1, V+2, ... (V: the last complete version), at most
  `relay_max_ahead` beyond V; a patch out of sequence is refused and nothing of it is kept.

Version v is published when all `ranks` ranks have sent patch v: the relay's bf16 copy takes each
rank's entries (rank order; disjoint anyway), rollout workers get one `rollout` message of kind
`bf16_values` with the flat indices (layout offset + index) and values, and the chain moves on:
hash_v = sha256(hash_{v-1} || that payload), hash_0 = sha256(fingerprint || "zeros"): version 0 is
all zeros, so rollout workers may join before any publisher. A rollout worker that joins gets the
relay's bf16 copy (`snapshot`, dtype bfloat16); `anchor_every` works as in training mode. Publishers are never timed out (a version cannot complete without them
anyway). An acknowledged patch stays until its version completes, also after its publisher leaves;
one that (re)joins is told V and re-anchors at V+1, and its patches beyond V that had not completed
are dropped. The relay keeps no checkpoint: after a restart the publishers
re-anchor and rollout workers take a new snapshot.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch

from ...codec import CodecError, Limits, decode_model, encode
from ...delta import SparseDelta
from ..protocol import ProtocolError, chain, field as hfield, pack
from .rollout import send_tensor
from .state import State


def layout_fingerprint(named_shapes) -> str:
    """The relay's model fingerprint: sha256 over (name, shape) of every tensor, in order. A rollout
    worker computes it from its own model (`[(n, p.shape) for n, p in model.named_parameters()]`);
    a ZeRO-3 rank from `p.ds_shape`."""
    h = hashlib.sha256()
    for name, shape in named_shapes:
        h.update(f"{name}:{tuple(int(s) for s in shape)};".encode())
    return "layout-" + h.hexdigest()[:32]


@dataclass
class _Rank:
    ranges: list[tuple[int, int]] | None = None  # per tensor, [lo, hi) of this rank's partition (from its anchor)
    pending: dict[int, list[SparseDelta]] = field(default_factory=dict)  # version -> per-tensor patch
    anchored_at: int = 0  # the version of its latest anchor (0: none since it joined)


class PatchRelay:
    """The relay's state and its two requests: a publisher's join and its patch."""

    def __init__(self, cfg, state: State, metrics, send):
        self.cfg, self.state, self.metrics, self.send = cfg, state, metrics, send
        self.ranks: int | None = None  # publishers per version, fixed by the first publisher's join
        self.names: list[str] | None = None
        self.shapes: list[tuple[int, ...]] | None = None
        self.offsets: list[int] | None = None  # flat offset of each tensor in the rollout layout
        self.by_rank: dict[int, _Rank] = {}
        self.rank_of: dict[str, int] = {}  # publisher worker id -> its rank
        self.limits: Limits | None = None
        self.published_bytes = 0
        self.first_seen: dict[int, float] = {}  # version -> monotonic time of its first patch

    # ------------------------------------------------------------------ membership
    def start(self) -> None:
        """The first peer fixed fingerprint and numel: version 0 is all zeros (rollout workers may join
        before any publisher; version 1's patch then carries every nonzero entry)."""
        if self.state.weights is None:
            self.state.weights = torch.zeros(self.state.numel, dtype=torch.bfloat16)
            self.state.hash = hashlib.sha256(self.state.fingerprint.encode() + b"zeros").hexdigest()

    def join(self, worker: str, h: dict) -> dict:
        """A publisher joins (or rejoins): checks its rank, returns welcome fields."""
        ranks = hfield(h, "ranks", int, 1, 1 << 16)
        rank = hfield(h, "rank", int, 0, ranks - 1)
        if self.ranks is None:
            self.ranks = ranks
        elif ranks != self.ranks:
            raise ProtocolError("bad_field", f"ranks={ranks}, but this relay assembles versions from {self.ranks} ranks")
        other = next((w for w, r in self.rank_of.items() if r == rank and w != worker), None)
        if other is not None:
            raise ProtocolError("duplicate", f"rank {rank} is already published by worker {other!r}")
        self.rank_of[worker] = rank
        r = self.by_rank.setdefault(rank, _Rank())
        r.pending.clear()  # a rejoin: what it sent beyond the last complete version never completed
        r.anchored_at = 0  # it must re-anchor (its first patch covers its whole partition again)
        return {"next_version": self.state.version + 1}

    def drop(self, worker: str) -> None:
        """A publisher left: its acknowledged patches stay (a rank that sent its last version and closed
        must not undo it); whoever joins as that rank next starts over from its anchor."""
        self.rank_of.pop(worker, None)

    # ------------------------------------------------------------------ patches
    def _fix_layout(self, patch: dict[str, SparseDelta]) -> None:
        names = list(patch)
        shapes = [tuple(d.shape) for d in patch.values()]
        fp = layout_fingerprint(zip(names, shapes))
        if fp != self.state.fingerprint:
            raise ProtocolError("fingerprint", f"the patch's tensors have layout fingerprint {fp}, the relay's peers "
                                               f"joined with {self.state.fingerprint}")
        numels = [int(torch.Size(s).numel()) for s in shapes]
        if sum(numels) != self.state.numel:
            raise ProtocolError("shape_mismatch", f"the patch's tensors hold {sum(numels)} entries, peers joined with "
                                                  f"numel {self.state.numel}")
        self.names, self.shapes = names, shapes
        self.offsets = [0]
        for n in numels[:-1]:
            self.offsets.append(self.offsets[-1] + n)

    def _check(self, rank: int, r: _Rank, patch: dict[str, SparseDelta]) -> tuple[list[SparseDelta], list | None]:
        """The patch as a per-tensor list checked against the layout and the rank's partition, and, for
        an anchor, the ranges it claims (committed by the caller only once the whole patch is accepted)."""
        if list(patch) != self.names or [tuple(d.shape) for d in patch.values()] != self.shapes:
            raise ProtocolError("shape_mismatch", "the patch's tensors (names, shapes, order) differ from the layout "
                                                  "fixed by the first patch")
        deltas = list(patch.values())
        if any(d.dtype != torch.bfloat16 for d in deltas):
            raise ProtocolError("bad_payload", "relay patches carry bf16 tensors (exact bf16 values)")
        if r.anchored_at:  # indices are strictly increasing (the codec checks): first and last bound them
            for name, d, (lo, hi) in zip(self.names, deltas, r.ranges):
                if d.k and (int(d.indices[0]) < lo or int(d.indices[-1]) >= hi):
                    raise ProtocolError("bad_payload", f"rank {rank}'s patch of {name!r} writes outside its partition "
                                                       f"[{lo}, {hi})")
            return deltas, None
        ranges = []  # its anchor: one contiguous range per tensor, which defines what it owns
        for name, d in zip(self.names, deltas):
            lo = int(d.indices[0]) if d.k else 0
            if d.k and int(d.indices[-1]) - lo + 1 != d.k:
                raise ProtocolError("bad_payload", f"rank {rank}'s first patch must cover its partition of {name!r} "
                                                   "as one contiguous range")
            ranges.append((lo, lo + d.k))
        if r.ranges is not None and ranges != r.ranges:
            raise ProtocolError("bad_payload", f"rank {rank} re-anchored with a different partition than before")
        for other, o in self.by_rank.items():
            if other == rank or o.ranges is None:
                continue
            for name, (lo, hi), (olo, ohi) in zip(self.names, ranges, o.ranges):
                if lo < ohi and olo < hi:
                    raise ProtocolError("bad_payload", f"rank {rank}'s partition of {name!r} [{lo}, {hi}) overlaps "
                                                       f"rank {other}'s [{olo}, {ohi})")
        claimed = {**{o: x.ranges for o, x in self.by_rank.items() if x.ranges is not None}, rank: ranges}
        if len(claimed) == self.ranks:  # the last anchor: together they must cover every entry
            for i, (name, shape) in enumerate(zip(self.names, self.shapes)):
                n = int(torch.Size(shape).numel())
                got = sum(rs[i][1] - rs[i][0] for rs in claimed.values())  # disjoint ranges in [0, n): n iff they cover
                if got != n:
                    raise ProtocolError("shape_mismatch", f"the {self.ranks} ranks' partitions of {name!r} cover {got} "
                                                          f"of its {n} entries (do the ranks agree on the world size?)")
        return deltas, ranges

    def patch(self, worker: str, h: dict, frames) -> dict:
        """A publisher's patch for one version; returns ack fields. Nothing is kept if it is refused."""
        rank = self.rank_of.get(worker)
        if rank is None:
            raise ProtocolError("unknown_worker", f"worker {worker!r} has not joined as a publisher")
        r = self.by_rank[rank]
        version = hfield(h, "version", int, 1, 1 << 62)
        expected = self.state.version + 1 + len(r.pending)
        if version != expected:
            raise ProtocolError("stale", f"rank {rank}: patch for version {version}, expected {expected} (relay at "
                                         f"version {self.state.version}, {len(r.pending)} of its patches pending)")
        if len(r.pending) >= self.cfg.relay_max_ahead:
            raise ProtocolError("not_ready", f"rank {rank} is {len(r.pending)} versions ahead of the slowest rank "
                                             f"(relay_max_ahead {self.cfg.relay_max_ahead}): wait for its ack")
        if len(frames) != 1:
            raise ProtocolError("malformed", f"patch carries {len(frames)} frames, expected 1")
        if self.limits is None:
            self.limits = Limits(max_header_bytes=1 << 20, max_tensors=4096, max_ndim=8, max_name_chars=256,
                                 max_body_bytes=self.cfg.max_frame_bytes)
        try:
            patch = decode_model(frames[0], self.limits)
        except CodecError as e:
            raise ProtocolError("bad_payload", str(e)) from None
        if self.names is None:
            self._fix_layout(patch)
        deltas, ranges = self._check(rank, r, patch)
        if ranges is not None:
            r.ranges, r.anchored_at = ranges, version
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
            patches = {rank: r.pending.pop(v) for rank, r in self.by_rank.items()}
            idx, vals = [], []
            for i, off in enumerate(self.offsets):  # tensor by tensor, ranks by where their range starts:
                for rank in sorted(patches, key=lambda q: self.by_rank[q].ranges[i][0]):  # sorted flat indices
                    d = patches[rank][i]
                    if d.k:
                        idx.append(d.indices.to(torch.int64) + off)
                        vals.append(d.values)
            flat_idx = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)
            flat_val = torch.cat(vals) if vals else torch.zeros(0, dtype=torch.bfloat16)
            w = self.state.weights
            changed = flat_val.view(torch.int16) != w[flat_idx].view(torch.int16)  # only what changes goes out
            flat_idx, flat_val = flat_idx[changed], flat_val[changed]
            w[flat_idx] = flat_val
            payload = encode(SparseDelta(flat_idx, flat_val, (self.state.numel,), torch.bfloat16), "auto", "bf16")
            self.state.version, self.state.hash = v, chain(self.state.hash, payload)
            self.metrics.version.set(v)
            self.metrics.rounds.inc()
            self.metrics.latency.observe(time.monotonic() - self.first_seen.pop(v, time.monotonic()))
            self._publish(payload)

    def _publish(self, payload: bytes) -> None:
        st = self.state
        header = pack("rollout", version=st.version, hash=st.hash, kind="bf16_values", decay=[])
        anchor = self.cfg.anchor_every and st.version % self.cfg.anchor_every == 0
        for p in self.rollout_peers():
            self.send(p.identity, header, payload)
            self.published_bytes += len(header) + len(payload)
            if anchor:
                self.send_snapshot(p.identity, "anchor")
            p.version = st.version

    def rollout_peers(self):  # set by the server: its in-sync rollout peers
        return []

    def send_snapshot(self, identity: bytes, op: str = "snapshot") -> None:
        send_tensor(self.send, identity, op, self.state, self.state.weights, dtype="bfloat16")
