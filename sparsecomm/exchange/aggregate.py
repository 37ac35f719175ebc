"""Aggregation: workers' sparse deltas -> the mean every replica applies, deterministically.

    mean_of_deltas(deltas, numel, total_entries)  one sparse mean (the coordinator's round)
    decode_all(payloads, numel)                   every peer's message, validated, in rank order
    apply_mean_(deltas, add)                      add(delta, 1/P) for each, in rank order

Every replica decodes the same bytes in rank order and adds each worker's (duplicate-free)
indices in turn, so every replica computes the same bits.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ..codec import CodecError, decode
from ..delta import SparseDelta


def decode_from(rank: int, buf, numel: int) -> SparseDelta:
    """Decode one peer's single-delta message over (numel,); a CodecError names the peer."""
    try:
        d = decode(buf)
    except CodecError as e:
        raise CodecError(f"message from rank {rank}: {e}") from None
    if d.shape != (numel,):
        raise CodecError(f"message from rank {rank} has shape {d.shape}, expected ({numel},)")
    return d


def decode_all(payloads: Sequence[memoryview | bytes], numel: int) -> list[SparseDelta]:
    """Decode every message before anything is applied: a bad one raises with nothing half-applied
    (every rank holds the same bytes after an all-gather, so every rank raises alike)."""
    return [decode_from(r, buf, numel) for r, buf in enumerate(payloads)]


def apply_mean_(deltas: Sequence[SparseDelta], add) -> int:
    """Add mean(deltas) without forming the mean: add(delta, 1/P) for each worker in rank order.
    Every replica performs the same additions in the same order, so they stay bit-identical; no
    union, no sort. Returns the number of entries added."""
    P = len(deltas)
    for d in deltas:
        add(d, 1.0 / P)
    return sum(d.k for d in deltas)


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
