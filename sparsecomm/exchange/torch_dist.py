"""torch.distributed transport: padded all-gather and uneven all-to-all of encoded bytes, dense all-reduce.

Works on gloo (CPU; tested here) and NCCL (GPU: payloads are staged through preallocated
device buffers, since NCCL only moves device memory). gloo cannot all-gather tensors of
different sizes, so the sizes are gathered first and every payload is padded to the largest;
`all_to_all_single` takes uneven split sizes on both backends (checked on gloo at 3 ranks),
so the all-to-all sends each peer exactly its own bytes. gloo has no int16: bytes move as uint8.

Bytes on the wire per worker (what `wire_bytes` reports, and trackers count):
    all-gather (ring): (P-1) x padded payload  (+ 8 bytes per rank for the size exchange)
    all-to-all:        sum of the payloads sent to the P-1 peers (+ 8 bytes per peer for sizes)
    all-reduce (ring): 2 (P-1)/P x numel x element size
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

# torch 2.13 renamed all_gather_into_tensor (the old name warns); same collective
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

SIZE_BYTES = 8  # one int64 per peer and collective, for the size exchange


class TorchDistTransport:
    def __init__(self, group=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("TorchDistTransport needs torch.distributed.init_process_group() first")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.backend = dist.get_backend(group)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        self._bufs: dict[str, torch.Tensor] = {}  # reused: fresh 40 MB buffers cost 40-80 ms here

    def _buffer(self, name: str, nbytes: int) -> torch.Tensor:
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < nbytes:
            cap = int(nbytes * 1.25) + 64  # headroom: message sizes vary a little from step to step
            buf = self._bufs[name] = torch.empty(cap, dtype=torch.uint8, device=self.device)
        return buf

    def _stage(self, name: str, payloads: Sequence[bytes], offsets: Sequence[int]) -> torch.Tensor:
        """Concatenate payloads at `offsets` in one reusable send buffer (one host->device copy)."""
        total = offsets[-1]
        buf = self._buffer(name, total)[:total]
        # on CPU the payloads go straight into the send buffer; on a GPU through one host array
        host = buf.numpy() if buf.device.type == "cpu" else np.empty(total, dtype=np.uint8)
        for p, off in zip(payloads, offsets):
            host[off:off + len(p)] = np.frombuffer(p, dtype=np.uint8)
        if total and buf.device.type != "cpu":
            buf.copy_(torch.from_numpy(host))
        return buf

    def all_gather_sizes(self, n: int) -> list[int]:
        mine = torch.tensor([n], dtype=torch.int64, device=self.device)
        sizes = torch.empty(self.world_size, dtype=torch.int64, device=self.device)
        _all_gather_single(sizes, mine, group=self.group)
        return sizes.tolist()

    def all_gather_bytes(self, payload: bytes) -> list[memoryview]:
        sizes = self.all_gather_sizes(len(payload))
        return self.all_gather_sized(payload, sizes)

    def all_gather_sized(self, payload: bytes, sizes: Sequence[int]) -> list[memoryview]:
        """All-gather once every rank knows every payload's size (gathered by the caller)."""
        top = max(sizes)
        send = self._stage("ag_send", [payload], [0, top])
        recv = self._buffer("ag_recv", top * self.world_size)[:top * self.world_size]
        _all_gather_single(recv, send, group=self.group)
        host = recv.cpu().numpy() if recv.device.type != "cpu" else recv.numpy()
        return [memoryview(host[r * top:r * top + sizes[r]]) for r in range(self.world_size)]

    def all_to_all_bytes(self, payloads: Sequence[bytes]) -> list[memoryview]:
        """Send payloads[j] to rank j; return what every rank sent to this one, in rank order.

        Two collectives: an all-to-all of the sizes, then one uneven `all_to_all_single` of the
        bytes. The views point into a reusable receive buffer: decode them before the next call.
        """
        P = self.world_size
        if len(payloads) != P:
            raise ValueError(f"all_to_all_bytes needs one payload per rank ({P}), got {len(payloads)}")
        send_sizes = torch.tensor([len(p) for p in payloads], dtype=torch.int64, device=self.device)
        recv_sizes = torch.empty(P, dtype=torch.int64, device=self.device)
        dist.all_to_all_single(recv_sizes, send_sizes, group=self.group)
        out_split, in_split = send_sizes.tolist(), recv_sizes.tolist()
        send = self._stage("a2a_send", payloads, np.concatenate([[0], np.cumsum(out_split)]).tolist())
        total_in = sum(in_split)
        recv = self._buffer("a2a_recv", total_in)[:total_in]
        dist.all_to_all_single(recv, send, output_split_sizes=in_split, input_split_sizes=out_split, group=self.group)
        host = recv.cpu().numpy() if recv.device.type != "cpu" else recv.numpy()
        offs = np.concatenate([[0], np.cumsum(in_split)]).tolist()
        return [memoryview(host[offs[r]:offs[r + 1]]) for r in range(P)]

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, group=self.group)

    def all_reduce_mean_(self, flat: torch.Tensor) -> None:
        dist.all_reduce(flat, group=self.group)
        flat.div_(self.world_size)

    def max_over_ranks(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t)

    def wire_bytes(self, sizes: Sequence[int]) -> tuple[int, int]:
        """Ring all-gather: every rank sends and receives P-1 padded blocks (+ 8 B size exchange each)."""
        b = (self.world_size - 1) * (max(sizes) + SIZE_BYTES)
        return b, b
