"""Durability: a full checkpoint every `checkpoint_every` rounds plus a journal of every round
in between, written before its aggregate is sent to anyone.

Why a journal: without it a coordinator killed at version 1103 restarts from the checkpoint at
1100 while its workers already applied 1101..1103 and removed those deltas from their residuals;
the three rounds are lost for good. With it, a restart replays the journal onto the checkpoint
and resumes at exactly the last version any worker may have seen, so every worker is in sync
(or one replay behind) and nothing is lost or applied twice. Cost: one append of the aggregate
payload (already encoded: sparse, small) and one fsync per round, measured by the
`sparsecomm_coordinator_journal_seconds` histogram.

Files in CHECKPOINT_DIR:
    coordinator.pt   torch.save'd dict (weights, version, hash, round, residual, retained,
                     selector state); replaced atomically (write, fsync, rename).
    journal.bin      records after the checkpoint's version: u32 length, u32 CRC-32, msgpack
                     {aggregate fields, mean, selector}; a torn last record (a crash mid-append)
                     fails its CRC and is discarded - it was never sent, so no worker has it.
"""
from __future__ import annotations

import logging
import os
import struct
import zlib
from collections import deque
from pathlib import Path
from typing import Iterator

import msgpack
import torch

from .state import Aggregate, State

log = logging.getLogger("sparsecomm.coordinator")
CHECKPOINT_FILE, JOURNAL_FILE = "coordinator.pt", "journal.bin"
_RECORD = struct.Struct("<II")  # body length, CRC-32 of the body


def save_checkpoint(directory: str | Path, state: State, residual: torch.Tensor | None,
                    selector_state: torch.Tensor | None) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (CHECKPOINT_FILE + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": 2, "fingerprint": state.fingerprint, "numel": state.numel, "weights": state.weights,
                    "version": state.version, "hash": state.hash, "round": state.round, "residual": residual,
                    "selector_state": selector_state, "retained": [a.to_dict() for a in state.retained]}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / CHECKPOINT_FILE)  # atomic: a crash leaves the old or the new checkpoint


def load_checkpoint(directory: str | Path, retain: int) -> tuple[State, torch.Tensor | None, torch.Tensor | None] | None:
    """(state, residual, selector state), or None if there is no checkpoint."""
    path = Path(directory) / CHECKPOINT_FILE
    if not path.exists():
        return None
    ck = torch.load(path, weights_only=False)
    retained = [Aggregate.from_dict(r) if isinstance(r, dict) else Aggregate(*r[:5]) for r in ck["retained"]]  # format 1: 5-tuples
    st = State(ck["fingerprint"], ck["numel"], ck["weights"], ck["version"], ck["hash"], ck["round"],
               deque(retained, maxlen=retain))
    return st, ck["residual"], ck.get("selector_state")


def _scan(path: Path) -> Iterator[tuple[int, bytes]]:
    """(length, body) of every intact record, oldest first; stops at the first torn or corrupt one."""
    if not path.exists():
        return
    data = path.read_bytes()
    off = 0
    while off + _RECORD.size <= len(data):
        n, crc = _RECORD.unpack_from(data, off)
        body = data[off + _RECORD.size:off + _RECORD.size + n]
        if len(body) != n or zlib.crc32(body) != crc:
            return
        yield n, body
        off += _RECORD.size + n


def read_journal(directory: str | Path) -> Iterator[dict]:
    """Every intact record: {"aggregate": Aggregate, "mean": bytes | None, "selector": bytes | None}."""
    for _, body in _scan(Path(directory) / JOURNAL_FILE):
        r = msgpack.unpackb(body, raw=False)
        yield {"aggregate": Aggregate.from_dict(r), "mean": r.get("mean"), "selector": r.get("selector")}


class Journal:
    """Append-only log of the rounds closed since the last checkpoint."""

    def __init__(self, directory: str | Path, fsync: bool = True):
        self.directory = Path(directory)
        self.path = self.directory / JOURNAL_FILE
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        good = sum(_RECORD.size + n for n, _ in _scan(self.path))
        self._f = open(self.path, "ab")
        if self._f.tell() != good:  # drop a torn tail so later records follow a valid one
            log.warning("journal: discarding %d bytes of a torn last record", self._f.tell() - good)
            self._f.truncate(good)

    def records(self) -> Iterator[dict]:
        return read_journal(self.directory)

    def append(self, agg: Aggregate, mean: bytes | None = None, selector: bytes | None = None) -> None:
        body = msgpack.packb({**agg.to_dict(), "mean": mean, "selector": selector})
        self._f.write(_RECORD.pack(len(body), zlib.crc32(body)) + body)
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())

    def reset(self) -> None:
        """After a checkpoint: its records are all covered by it."""
        self._f.truncate(0)
        self._f.seek(0)
        if self.fsync:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()
