"""A trainer's outbox: the deltas it pushed to the coordinator, kept on disk until a checkpoint covers them.

Why: error feedback removes a pushed delta from the trainer's residual once its aggregate
arrives. A trainer killed after a push but before its next checkpoint restarts with a residual
that still holds that delta; if the coordinator counted it, the next push would send it again
(counted twice). So `CoordinatorTransport(outbox=path)` records (step, round, payload) here
before every push; on resume, the coordinator says which of those rounds counted the trainer
(`join` with `pushed_since`), and exactly those deltas are subtracted from the restored
residual, as the lost process had done. Uncounted deltas stay in the residual and go out with
the next push: nothing is lost and nothing is added twice.

    box = Outbox("ckpt/t0.outbox")
    box.append(step, round, payload)          # before the push is sent
    box.checkpointed(step)                    # a checkpoint now holds the state at `step`
    box.since(step) -> [(round, payload)]     # on resume from the checkpoint taken at `step`

Each record names the checkpoint its process's state descends from (`base`), so a resume from
checkpoint S takes exactly the pushes made after S - by the lost process and by any earlier
restart from S - and never those of a process that ran past S on an older checkpoint's state.
Records are msgpack maps appended to one file, one write() each, before the push leaves: that
survives kill -9 of the process (the page cache is the kernel's). A torn last record (killed
mid-write) was never sent and is ignored. Records no resume from the last two checkpoints can
need are pruned, so a checkpoint whose write failed still finds what it needs.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import msgpack

log = logging.getLogger("sparsecomm.outbox")


class Outbox:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.base = -1  # the step of the checkpoint this process's state descends from (-1: none)
        self._covered: list[int] = []  # the last two checkpoints' steps
        self._prune: int | None = None  # before the next append: keep only records with base >= this
        self._fresh = True  # neither resumed nor appended yet: a fresh run starts a new file

    def records(self) -> list[dict]:
        """Every complete record in the file, oldest first."""
        if not self.path.exists():
            return []
        out, unpacker = [], msgpack.Unpacker(raw=False)
        unpacker.feed(self.path.read_bytes())
        try:
            for r in unpacker:  # an incomplete tail (a torn write) just ends the iteration
                if not (isinstance(r, dict) and {"base", "step", "round", "payload"} <= r.keys()):
                    raise ValueError(f"not an outbox record: {type(r).__name__}")
                out.append(r)
        except ValueError as e:  # msgpack's errors are ValueErrors too
            log.warning("outbox %s: unreadable after record %d (%s); the rest is ignored", self.path, len(out), e)
        return out

    def first_round(self) -> int | None:
        """The oldest round any record names (what to ask the coordinator about), or None."""
        recs = self.records()
        return min(r["round"] for r in recs) if recs else None

    def since(self, step: int) -> list[tuple[int, bytes]]:
        """On resume from the checkpoint taken at `step`: (round, payload) of every push made by a
        process whose state descends from that checkpoint or a later one (pushed after it was
        taken, perhaps by an earlier restart), one per round (a re-send into the same round is the
        same delta), oldest first."""
        self.base, self._covered, self._fresh = step, [step], False
        by_round = {r["round"]: bytes(r["payload"]) for r in self.records() if r["base"] >= step}
        return sorted(by_round.items())

    def checkpointed(self, step: int) -> None:
        """A checkpoint now holds this process's state at `step`."""
        self.base, self._covered = step, (self._covered + [step])[-2:]
        if len(self._covered) == 2:  # keep what a resume from either of the last two checkpoints needs
            self._prune = self._covered[0]

    def append(self, step: int, rnd: int, payload) -> None:
        if self._fresh or self._prune is not None:
            kept = [] if self._fresh else [r for r in self.records() if r["base"] >= self._prune]
            tmp = self.path.with_name(self.path.name + ".tmp")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(b"".join(msgpack.packb(r, use_bin_type=True) for r in kept))
            os.replace(tmp, self.path)
            self._fresh, self._prune = False, None
        with open(self.path, "ab") as f:
            f.write(msgpack.packb({"base": self.base, "step": step, "round": rnd, "payload": bytes(payload)},
                                  use_bin_type=True))
