"""What the coordinator owns: the canonical weights, their version and hash chain, and the last
`retain` aggregates (for replay to workers that fell behind, and for idempotent re-pushes).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from ..protocol import Decay, decay_wire, pack


@dataclass(frozen=True)
class Aggregate:
    """One closed round: its payload and exactly which deltas it averages."""

    version: int  # the weights version this aggregate produces
    round: int
    parent_hash: str
    hash: str  # sha256(parent_hash || payload)
    payload: bytes
    contributors: tuple[str, ...] = ()  # on-time pushes, sorted
    late: tuple[tuple[str, int], ...] = ()  # (worker, round it was pushed for) of folded late deltas
    decay: Decay = ()  # the round's agreed weight decay, applied before the payload is added

    def header(self) -> bytes:
        return pack("aggregate", round=self.round, version=self.version, hash=self.hash, parent_hash=self.parent_hash,
                    contributors=list(self.contributors), late=[list(x) for x in self.late],
                    decay=decay_wire(self.decay))

    def counts(self, worker: str, rnd: int) -> bool:
        """Does this aggregate include `worker`'s delta pushed for round `rnd`?"""
        return (rnd == self.round and worker in self.contributors) or (worker, rnd) in self.late

    def to_dict(self) -> dict:
        return {"version": self.version, "round": self.round, "parent_hash": self.parent_hash, "hash": self.hash,
                "payload": self.payload, "contributors": list(self.contributors), "late": [list(x) for x in self.late],
                "decay": decay_wire(self.decay)}

    @classmethod
    def from_dict(cls, d: dict) -> "Aggregate":
        return cls(d["version"], d["round"], d["parent_hash"], d["hash"], bytes(d["payload"]),
                   tuple(d.get("contributors", ())), tuple((w, r) for w, r in d.get("late", ())),
                   tuple((int(a), int(b), float(f)) for a, b, f in d.get("decay", ())))


@dataclass
class State:
    """What a checkpoint holds (with the coordinator's error-feedback residual and selector state)."""

    fingerprint: str | None = None
    numel: int = 0
    weights: torch.Tensor | None = None  # (numel,) fp32, canonical
    version: int = 0
    hash: str = ""
    round: int = 0
    retained: deque = field(default_factory=deque)  # of Aggregate, oldest first

    def find(self, rnd: int) -> Aggregate | None:
        """The retained aggregate that closed round `rnd`, if still retained."""
        for a in reversed(self.retained):
            if a.round == rnd:
                return a
        return None
