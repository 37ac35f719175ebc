"""Transport: the collectives the sparse exchange is built from.

Every operation is collective: every worker calls it, in the same order.

    all_gather_bytes(payload)      -> [payload of rank 0, ..., payload of rank P-1]
    all_to_all_bytes(payloads)     -> [what rank 0 sent me, ..., what rank P-1 sent me]
    all_reduce_sum_(tensor)        tensor becomes the elementwise sum over workers, in place
    all_reduce_mean_(tensor)       the same, divided by P
    max_over_ranks(value)          one float, the maximum over workers (decisions, timings)
    wire_bytes(sizes)              (sent, received) per worker for the last all-gather of `sizes`

Implementations: `LocalTransport` (one worker), `TorchDistTransport` (torch.distributed: gloo,
NCCL; torch_dist.py), `CoordinatorTransport` (ZeroMQ; zmq_client.py, all-gather only: the
coordinator aggregates, so it reports world_size 1).
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch


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
    device = torch.device("cpu")

    def all_gather_bytes(self, payload: bytes) -> list[memoryview]:
        return [memoryview(payload)]

    def all_to_all_bytes(self, payloads: Sequence[bytes]) -> list[memoryview]:
        return [memoryview(payloads[0])]

    def all_gather_sizes(self, n: int) -> list[int]:
        return [n]

    def all_gather_sized(self, payload: bytes, sizes: Sequence[int]) -> list[memoryview]:
        return [memoryview(payload)]

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        pass

    def all_reduce_mean_(self, flat: torch.Tensor) -> None:
        pass

    def wire_bytes(self, sizes: Sequence[int]) -> tuple[int, int]:
        return 0, 0

    def max_over_ranks(self, value: float) -> float:
        return value
