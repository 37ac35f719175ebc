"""Communication tracker: bytes on the wire, phase timings, and a measured dense baseline.

    comm = CommTracker(dense_baseline_every=10, group=None)   # group: a torch.distributed group
    with comm.phase("select"): ...
    comm.add_sent(len(buf)); comm.add_received(sum(len(b) for b in bufs))
    comm.note(path="sparse", k=k, density=k / n)
    comm.dense_baseline(step, tensors)   # every K steps: a real all_reduce of the same tensors
    metrics = comm.collect(numel, element_bytes, world_size)   # and reset

Bytes are whatever the caller counted from the buffers it actually sent (headers included).
`comm/dense_equiv_bytes` is the formula for a ring all-reduce, 2 (P-1)/P x N x bytes per worker,
reported beside - never instead of - `timing/dense_allreduce_s`, which is measured: the same
tensors copied into one preallocated flat buffer and all-reduced on the same process group, in
the same run, with barriers around it so the timing is the collective's alone.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterable

import torch
import torch.distributed as dist


def ring_allreduce_bytes(numel: int, element_bytes: int, world_size: int) -> int:
    """Bytes one worker sends in a ring all-reduce of `numel` elements."""
    if world_size <= 1:
        return 0
    return int(2 * (world_size - 1) / world_size * numel * element_bytes)


class CommTracker:
    def __init__(self, dense_baseline_every: int = 0, group=None):
        if dense_baseline_every < 0:
            raise ValueError("dense_baseline_every must be >= 0 (0 = never)")
        self.every, self.group = dense_baseline_every, group
        self._buf: torch.Tensor | None = None  # reused: fresh 40 MB buffers cost 40-80 ms here
        self.reset()

    def reset(self) -> None:
        self.timing_s: dict[str, float] = {}
        self.sent_bytes = 0
        self.recv_bytes = 0
        self.notes: dict[str, float | int | str] = {}
        self.dense_allreduce_s: float | None = None

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timing_s[name] = self.timing_s.get(name, 0.0) + time.perf_counter() - t0

    def add_sent(self, nbytes: int) -> None:
        self.sent_bytes += int(nbytes)

    def add_received(self, nbytes: int) -> None:
        self.recv_bytes += int(nbytes)

    def note(self, **kw) -> None:
        self.notes.update(kw)

    def dense_baseline(self, step: int, tensors: Iterable[torch.Tensor]) -> float | None:
        """Every `dense_baseline_every` steps, time a real all_reduce of these tensors; else None."""
        if not self.every or step % self.every or not dist.is_available() or not dist.is_initialized():
            return None
        tensors = list(tensors)
        n = sum(t.numel() for t in tensors)
        dev = tensors[0].device if tensors else torch.device("cpu")
        if self._buf is None or self._buf.numel() != n or self._buf.device != dev:
            self._buf = torch.empty(n, dtype=torch.float32, device=dev)
        off = 0
        for t in tensors:
            self._buf[off:off + t.numel()].copy_(t.detach().reshape(-1))
            off += t.numel()
        dist.barrier(group=self.group)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        dist.all_reduce(self._buf, group=self.group)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        self.dense_allreduce_s = time.perf_counter() - t0
        return self.dense_allreduce_s

    def collect(self, numel: int, element_bytes: int = 4, world_size: int | None = None) -> dict:
        """This step's metrics (comm/*, timing/*), then reset for the next step."""
        if world_size is None:
            world_size = dist.get_world_size(self.group) if dist.is_available() and dist.is_initialized() else 1
        out = {"comm/sent_bytes": self.sent_bytes, "comm/recv_bytes": self.recv_bytes,
               "comm/dense_equiv_bytes": ring_allreduce_bytes(numel, element_bytes, world_size)}
        out.update({f"comm/{k}": v for k, v in self.notes.items()})
        out.update({f"timing/{k}_s": v for k, v in self.timing_s.items()})
        if self.dense_allreduce_s is not None:
            out["timing/dense_allreduce_s"] = self.dense_allreduce_s
        self.reset()
        return out
