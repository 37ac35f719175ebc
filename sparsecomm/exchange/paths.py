"""Path choice: which collective carries one exchange, decided identically on every rank.

Three paths (SparCML, arXiv 1802.08021; Ok-Topk, arXiv 2201.07598), predicted bytes per worker
for k entries of N at P workers, b bytes per entry (index + value), H bytes of framing a message:

    dense       ring all-reduce of the fp32 buffer          2 (P-1)/P x 4 N
    allgather   every worker receives every delta           (P-1) x (k b + H)
    split       sparse reduce-scatter to shard owners, then (P-1) x (k/P x b + H)    phase 1
                all-gather of the owners' re-sparsified     (P-1) x (k/P x b + H)    phase 2
                shards (split.py): ~2 k b whatever P is

`choose_path` takes the fewest bytes (ties go to the path with fewer collectives: allgather
before split, so P=2 keeps its single all-gather). Exact split (no owner re-sparsification)
sends the owners' union in phase 2, up to min(P k, N)/P entries per owner with fp32 values.

`PathChooser` adds the "measured" policy: time every candidate (max over ranks, so every rank
holds the same numbers) and keep the fastest, re-probing the others every `probe_every`
exchanges. That is what keeps sparse from losing on fast links, where selection and coding cost
more than the bytes they save. Candidates may also differ in index codec (raw indices when the
CPU is the bottleneck, entropy-coded when bytes are): the measured policy times both.
"""
from __future__ import annotations

from ..codec import information_floor_bits
from ..track.comm import ring_allreduce_bytes
from .split import OWNER_SHARE

PATHS = ("dense", "allgather", "split")
SWITCH_POLICIES = ("volume", "measured")
HEADER_BYTES = 160  # framing + msgpack header of a one-tensor message, for the volume prediction


def index_bytes_per_entry(numel: int, k: int, index_codec: str) -> float:
    """Predicted index bytes per entry: raw is 4 (8 above 2**32), anything else near the floor."""
    if index_codec == "raw":
        return 4.0 if numel <= 2**32 else 8.0
    return information_floor_bits(numel, k) / max(k, 1) / 8


def predicted_bytes(path: str, numel: int, k: int, world_size: int, value_bytes: int, index_codec: str = "auto",
                    exact: bool = False, owner_share: float = OWNER_SHARE) -> float:
    """Bytes one worker sends for one exchange on `path` (the module docstring's formulas)."""
    P = world_size
    if P <= 1:
        return 0.0
    if path == "dense":
        return float(ring_allreduce_bytes(numel, 4, P))
    b = index_bytes_per_entry(numel, k, index_codec) + value_bytes
    if path == "allgather":
        return (P - 1) * (k * b + HEADER_BYTES)
    if path == "split":
        phase1 = (P - 1) * (k / P * b + HEADER_BYTES)
        if exact:  # the owners' union, fp32 values
            union = min(P * k, numel) / P
            return phase1 + (P - 1) * (union * (index_bytes_per_entry(numel, k, index_codec) + 4) + HEADER_BYTES)
        return phase1 + (P - 1) * (owner_share * k / P * b + HEADER_BYTES)
    raise ValueError(f"unknown path {path!r}; choose from {PATHS}")


def choose_path(numel: int, k: int, world_size: int, value_bytes: int, *, candidates=PATHS, index_codec: str = "auto",
                exact: bool = False, margin: float = 1.0, owner_share: float = OWNER_SHARE) -> str:
    """The candidate that moves the fewest bytes; dense wins only if the best sparse path moves more
    than `margin` x its volume. k = numel (density 1) is dense; one worker sends its delta as is."""
    sparse = [c for c in PATHS if c in candidates and c != "dense"]
    if not sparse or (k >= numel and "dense" in candidates):
        return "dense"
    if world_size == 1:  # one worker (or the coordinator, which aggregates): send the delta itself
        return sparse[0]
    vol = {c: predicted_bytes(c, numel, k, world_size, value_bytes, index_codec, exact, owner_share) for c in sparse}
    best = min(sparse, key=lambda c: (vol[c], PATHS.index(c)))
    if "dense" in candidates and vol[best] > margin * predicted_bytes("dense", numel, k, world_size, value_bytes):
        return "dense"
    return best


class PathChooser:
    """Picks a path for each exchange, identically on every rank.

    volume    `choose_path`: bytes alone. Deterministic, so runs and resumes are reproducible.
    measured  bytes first (dense whenever it also moves fewer bytes), then wall-clock: every
              candidate is timed once, the fastest is used, and the others are re-probed in turn
              every `probe_every` exchanges. The volume rule's own candidate (fewest bytes) is kept
              unless another is faster by more than `tolerance` (10%): timings on a shared machine
              jitter by that much, and between near-equal candidates the one that moves fewer bytes
              is the better bet (results/ddp.md, before this rule: at 100 Mbit/s noisy probes picked
              raw indices for some DDP buckets, 1.2-1.3x the bytes, and the step was slower than with
              the volume rule).
              Decisions depend on timings: not bit-reproducible across runs. Every path is a valid
              exchange, so probing changes speed, not results.
    Candidates are path names, optionally "path:index_codec" (e.g. "split:raw", "split:auto").
    """

    def __init__(self, policy: str = "volume", candidates=PATHS, margin: float = 1.0, probe_every: int = 50,
                 ema: float = 0.5, index_codec: str = "auto", exact: bool = False, owner_share: float = OWNER_SHARE,
                 tolerance: float = 0.1):
        if policy not in SWITCH_POLICIES:
            raise ValueError(f"switch policy must be one of {SWITCH_POLICIES}, got {policy!r}")
        if probe_every < 2 or margin <= 0 or not 0 < ema <= 1 or tolerance < 0:
            raise ValueError("need probe_every >= 2, margin > 0, 0 < ema <= 1, tolerance >= 0")
        candidates = tuple(candidates)
        bad = [c for c in candidates if c.split(":")[0] not in PATHS]
        if not candidates or bad:
            raise ValueError(f"path candidates must be among {PATHS} (optionally 'path:codec'), got {list(candidates)}")
        self.policy, self.candidates, self.margin, self.probe_every, self.ema = policy, candidates, margin, probe_every, ema
        self.index_codec, self.exact, self.owner_share, self.tolerance = index_codec, exact, owner_share, tolerance
        self.time_s: dict[str, float] = {}
        self.decisions = 0

    def choose(self, numel: int, k: int, world_size: int, value_bytes: int) -> str:
        paths = tuple(dict.fromkeys(c.split(":")[0] for c in self.candidates))
        by_volume = choose_path(numel, k, world_size, value_bytes, candidates=paths, index_codec=self.index_codec,
                                exact=self.exact, margin=self.margin, owner_share=self.owner_share)
        if self.policy == "volume" or by_volume == "dense" or world_size == 1:
            return next(c for c in self.candidates if c.split(":")[0] == by_volume)
        timed = [c for c in self.candidates if c.split(":")[0] != "dense" or "dense" in paths]
        self.decisions += 1
        for c in timed:
            if c not in self.time_s:
                return c  # probe each candidate once
        def cost(c: str) -> float:
            return self.time_s[c] * (self.margin if c == "dense" else 1.0)

        best = min(timed, key=cost)
        fewest = next((c for c in (f"{by_volume}:{self.index_codec}", by_volume) if c in timed), None)
        if fewest is not None and cost(fewest) <= (1 + self.tolerance) * cost(best):
            best = fewest  # near-equal in time: the fewest bytes
        if self.decisions % self.probe_every == 0:
            others = [c for c in timed if c != best]
            if others:
                return others[(self.decisions // self.probe_every) % len(others)]  # re-probe the others in turn
        return best

    def observe(self, candidate: str, seconds: float) -> None:
        """Record an exchange's wall-clock (already the max over ranks)."""
        old = self.time_s.get(candidate)
        self.time_s[candidate] = seconds if old is None else (1 - self.ema) * old + self.ema * seconds

    def state_dict(self) -> dict:
        return {"time_s": dict(self.time_s), "decisions": self.decisions}

    def load_state_dict(self, state: dict) -> None:
        self.time_s, self.decisions = dict(state["time_s"]), state["decisions"]
