"""torch.distributed transport: sparse all-gather of encoded messages, dense all-reduce fallback.

Works on gloo (CPU; tested here) and NCCL (GPU: payloads are staged through preallocated
device buffers, since NCCL only moves device memory). gloo cannot all-gather tensors of
different sizes, so the sizes are gathered first and every payload is padded to the largest.

Bytes on the wire per worker (what `wire_bytes_*` report, and trackers count):
    all-gather (ring): (P-1) x padded payload  (+ 8 bytes per rank for the size exchange)
    all-reduce (ring): 2 (P-1)/P x numel x element size
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


class TorchDistTransport:
    def __init__(self, group=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("TorchDistTransport needs torch.distributed.init_process_group() first")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.backend = dist.get_backend(group)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        self._send: torch.Tensor | None = None
        self._recv: list[torch.Tensor] = []

    def _buffers(self, nbytes: int) -> None:
        if self._send is None or self._send.numel() < nbytes:
            cap = int(nbytes * 1.25) + 64  # headroom: message sizes vary a little from step to step
            self._send = torch.empty(cap, dtype=torch.uint8, device=self.device)
            self._recv = [torch.empty(cap, dtype=torch.uint8, device=self.device) for _ in range(self.world_size)]

    def all_gather_sizes(self, n: int) -> list[int]:
        mine = torch.tensor([n], dtype=torch.int64, device=self.device)
        sizes = [torch.empty(1, dtype=torch.int64, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(sizes, mine, group=self.group)
        return [int(s.item()) for s in sizes]

    def all_gather_bytes(self, payload: bytes) -> list[memoryview]:
        sizes = self.all_gather_sizes(len(payload))
        top = max(sizes)
        self._buffers(top)
        send = self._send[:top]
        src = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)
        send[:len(payload)].copy_(src)
        recv = [r[:top] for r in self._recv]
        dist.all_gather(recv, send, group=self.group)
        return [memoryview(recv[r][:sizes[r]].cpu().numpy()) for r in range(self.world_size)]

    def all_reduce_mean_(self, flat: torch.Tensor) -> None:
        dist.all_reduce(flat, group=self.group)
        flat.div_(self.world_size)

    def max_over_ranks(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t)

    def wire_bytes(self, sizes: Sequence[int]) -> tuple[int, int]:
        """Ring all-gather: every rank sends and receives P-1 padded blocks (+ 8 B size exchange each)."""
        b = (self.world_size - 1) * (max(sizes) + 8)
        return b, b
