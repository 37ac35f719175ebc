"""Chunked transfer of a whole tensor over the coordinator protocol: `init` (a trainer seeds W0),
`snapshot` (fp32 weights to a worker that fell too far behind) and `anchor` (full weights to
rollout workers). One chunk size and one framing, used by both sides.

Each chunk travels as one message: a header with {index, total, offset} (offset in bytes into
the tensor's raw little-endian bytes) and one raw frame of at most CHUNK_BYTES. Chunks may
arrive in any order; the receiver writes each straight into place (one copy) and refuses
chunks that repeat or do not sit exactly where their index says.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

CHUNK_BYTES = 8 << 20  # 8 MiB: large enough that per-message overhead vanishes, small enough to interleave


def raw_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's bytes as a uint8 array (no copy). bf16 has no numpy dtype: view as int16."""
    t = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    return t.numpy().view(np.uint8)


def split(raw: np.ndarray, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[dict, memoryview]]:
    """({index, total, offset}, chunk) for every chunk of `raw` (zero-copy views)."""
    total = max(1, math.ceil(raw.size / chunk_bytes))
    for i in range(total):
        yield {"index": i, "total": total, "offset": i * chunk_bytes}, memoryview(raw[i * chunk_bytes:(i + 1) * chunk_bytes])


class ChunkError(ValueError):
    """A chunk that does not fit the tensor being assembled (the caller maps it to a protocol error)."""


class Assembler:
    """Receives the chunks of one tensor into `out` (a uint8 view of the target), written by `split`.

    The layout is fixed by the size alone (chunk i starts at i x chunk_bytes and only the last
    may be short), so a chunk that does not sit exactly there is refused: no overlaps, no holes.
    """

    def __init__(self, out: np.ndarray, chunk_bytes: int = CHUNK_BYTES):
        self.out, self.chunk_bytes = out, chunk_bytes
        self.total = max(1, math.ceil(out.size / chunk_bytes))
        self.seen: set[int] = set()

    def add(self, index: int, total: int, offset: int, chunk) -> bool:
        """Write one chunk into place; True once every chunk has arrived."""
        n = len(chunk)
        if total != self.total or not 0 <= index < total or index in self.seen:
            raise ChunkError(f"chunk {index}/{total} repeated or not one of the {self.total} chunks of {self.out.size} bytes")
        if offset != index * self.chunk_bytes or n != min(self.chunk_bytes, self.out.size - offset):
            raise ChunkError(f"chunk {index} at offset {offset} with {n} bytes is not where chunk {index} belongs")
        self.out[offset:offset + n] = np.frombuffer(chunk, dtype=np.uint8)  # one copy, into place
        self.seen.add(index)
        return len(self.seen) == total
