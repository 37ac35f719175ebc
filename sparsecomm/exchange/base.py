"""Transport: how workers' sparse deltas become one aggregate that every replica applies.

A transport has two operations, both collective (every worker calls them, in the same order):

    all_gather_bytes(payload) -> [payload of rank 0, ..., payload of rank P-1]
    all_reduce_mean_(flat)    -> flat becomes the mean over workers, in place
    wire_bytes(sizes)         -> (sent, received) bytes per worker for that all-gather

`aggregate_mean` turns the gathered messages into one sparse mean delta deterministically:
every rank decodes the same bytes in rank order and adds each worker's (duplicate-free)
indices in turn, so every replica computes the same bits.
"""
from __future__ import annotations

import itertools
from typing import Iterable, Protocol, Sequence

import torch

from ..codec import CodecError, decode
from ..delta import SparseDelta


class Transport(Protocol):
    world_size: int
    rank: int

    def all_gather_bytes(self, payload: bytes) -> list[memoryview]: ...

    def all_reduce_mean_(self, flat: torch.Tensor) -> None: ...

    def wire_bytes(self, sizes: Sequence[int]) -> tuple[int, int]: ...

    def max_over_ranks(self, value: float) -> float: ...


class LocalTransport:
    """One worker: no communication (ASPG degenerates to a sparse local optimizer)."""

    world_size, rank = 1, 0

    def all_gather_bytes(self, payload: bytes) -> list[memoryview]:
        return [memoryview(payload)]

    def all_reduce_mean_(self, flat: torch.Tensor) -> None:
        pass

    def wire_bytes(self, sizes: Sequence[int]) -> tuple[int, int]:
        return 0, 0

    def max_over_ranks(self, value: float) -> float:
        return value


def _decode_from(rank: int, buf, numel: int) -> SparseDelta:
    try:
        d = decode(buf)
    except CodecError as e:
        raise CodecError(f"message from rank {rank}: {e}") from None
    if d.shape != (numel,):
        raise CodecError(f"message from rank {rank} has shape {d.shape}, expected ({numel},)")
    return d


def mean_of_deltas(deltas: Iterable[SparseDelta], numel: int, total_entries: int, device=None) -> SparseDelta:
    """Mean of sparse deltas over (numel,), deterministically: rank-order sums of unique indices.

    Two strategies, same bits, chosen from `total_entries` (sum of the deltas' k, or an estimate):
    - sparse union (total <= numel / 8): `torch.unique` over all indices, O(total) memory;
    - dense accumulation (total > numel / 8): one delta at a time into an O(numel) buffer, so
      `deltas` may be a lazy iterator and large deltas are never all held at once (at 10% density
      and P = 8 the union would need ~20 bytes x 0.8 numel; the buffer needs 5 bytes x numel).
    """
    if total_entries > numel // 8:
        acc = torch.zeros(numel, dtype=torch.float32)
        touched = torch.zeros(numel, dtype=torch.bool)
        count = 0
        for d in deltas:
            acc.index_add_(0, d.indices, d.values.to(torch.float32))
            touched[d.indices] = True
            count += 1
        union = torch.nonzero(touched).squeeze(1)
        summed = acc[union]
    else:
        ds = list(deltas)
        count = len(ds)
        if not ds:
            return SparseDelta.empty((numel,))
        union, inverse = torch.unique(torch.cat([d.indices for d in ds]), sorted=True, return_inverse=True)
        summed = torch.zeros(union.numel(), dtype=torch.float32)
        start = 0
        for d in ds:  # rank order; indices unique within one delta -> deterministic index_add_
            summed.index_add_(0, inverse[start:start + d.k], d.values.to(torch.float32))
            start += d.k
    if count == 0:
        return SparseDelta.empty((numel,))
    summed.div_(count)
    if device is not None:
        union, summed = union.to(device), summed.to(device)
    return SparseDelta(union, summed, (numel,), torch.float32)


def apply_mean_(payloads: Sequence[memoryview | bytes], numel: int, add, timing: dict | None = None) -> int:
    """Add mean(deltas) to the weights without forming the mean: for each worker in rank order,
    decode its message and call `add(delta, 1/P)`. Every replica performs the same additions in
    the same order, so they stay bit-identical; no union, no sort, one decoded message in memory
    at a time. (Rounding differs from adding the precomputed mean, identically everywhere.)
    Returns the number of entries added; `timing` accumulates decode_s and apply_s.
    """
    import time

    total, P = 0, len(payloads)
    for r, buf in enumerate(payloads):
        t0 = time.perf_counter()
        d = _decode_from(r, buf, numel)
        t1 = time.perf_counter()
        add(d, 1.0 / P)
        t2 = time.perf_counter()
        total += d.k
        if timing is not None:
            timing["decode"] = timing.get("decode", 0.0) + t1 - t0
            timing["apply"] = timing.get("apply", 0.0) + t2 - t1
    return total


def aggregate_mean(payloads: Sequence[memoryview | bytes], numel: int, device=None) -> SparseDelta:
    """Decode every worker's message (rank order, lazily) and average them (see `mean_of_deltas`).

    The total entry count is estimated from the first message (k x P) before the rest are decoded.
    """
    first = _decode_from(0, payloads[0], numel)
    rest = (_decode_from(r, payloads[r], numel) for r in range(1, len(payloads)))
    return mean_of_deltas(itertools.chain([first], rest), numel, first.k * len(payloads), device)


HEADER_BYTES = 160  # framing + msgpack header of a one-tensor message, for the volume prediction


def choose_path(numel: int, density: float, world_size: int, value_bytes: int, dense_fallback: bool = True,
                margin: float = 1.0) -> str:
    """'dense' or 'sparse' for one exchange, from sizes alone, so every rank decides the same.

    Sparse all-gather volume per worker (P-1) x (k x bytes/entry + header), with bytes/entry from
    the index information floor plus the value size, against the ring all-reduce's
    2 (P-1)/P x numel x 4 bytes (SparCML's switch). Density 1 is always dense.
    """
    from ..codec import information_floor_bits
    from ..compress import k_for
    from ..track.comm import ring_allreduce_bytes

    if density >= 1.0:
        return "dense"
    if not dense_fallback or world_size == 1:
        return "sparse"
    k = k_for(numel, density)
    bytes_per_entry = information_floor_bits(numel, k) / max(k, 1) / 8 + value_bytes
    sparse = (world_size - 1) * (k * bytes_per_entry + HEADER_BYTES)
    return "dense" if sparse > margin * ring_allreduce_bytes(numel, 4, world_size) else "sparse"


SWITCH_POLICIES = ("volume", "measured")


class PathChooser:
    """Picks 'sparse' or 'dense' for each exchange, identically on every rank.

    volume    `choose_path`: bytes alone. Deterministic, so runs and resumes are reproducible.
    measured  bytes first (dense whenever it also moves fewer bytes), then wall-clock: both paths
              are timed (max over ranks, so every rank holds the same numbers), the faster one is
              used, and the other is re-probed every `probe_every` exchanges. This is what keeps a
              sparse exchange from losing on fast links, where selection and coding cost more than
              the bytes they save. Decisions depend on timings: not bit-reproducible across runs.
    Both paths are valid exchanges (dense sends everything), so probing never changes what
    training can reach, only how fast.
    """

    def __init__(self, policy: str = "volume", dense_fallback: bool = True, margin: float = 1.0,
                 probe_every: int = 50, ema: float = 0.5):
        if policy not in SWITCH_POLICIES:
            raise ValueError(f"switch policy must be one of {SWITCH_POLICIES}, got {policy!r}")
        if probe_every < 2 or margin <= 0 or not 0 < ema <= 1:
            raise ValueError("need probe_every >= 2, margin > 0, 0 < ema <= 1")
        self.policy, self.dense_fallback, self.margin, self.probe_every, self.ema = policy, dense_fallback, margin, probe_every, ema
        self.time_s: dict[str, float] = {}
        self.decisions = 0

    def choose(self, numel: int, density: float, world_size: int, value_bytes: int) -> str:
        by_volume = choose_path(numel, density, world_size, value_bytes, self.dense_fallback, self.margin)
        if self.policy == "volume" or by_volume == "dense" or not self.dense_fallback or world_size == 1:
            return by_volume
        self.decisions += 1
        for path in ("sparse", "dense"):
            if path not in self.time_s:
                return path  # probe each path once
        best = "dense" if self.time_s["dense"] * self.margin < self.time_s["sparse"] else "sparse"
        if self.decisions % self.probe_every == 0:
            return "sparse" if best == "dense" else "dense"  # re-probe the other path
        return best

    def observe(self, path: str, seconds: float) -> None:
        """Record an exchange's wall-clock (already the max over ranks)."""
        old = self.time_s.get(path)
        self.time_s[path] = seconds if old is None else (1 - self.ema) * old + self.ema * seconds

    def state_dict(self) -> dict:
        return {"time_s": dict(self.time_s), "decisions": self.decisions}

    def load_state_dict(self, state: dict) -> None:
        self.time_s, self.decisions = dict(state["time_s"]), state["decisions"]
