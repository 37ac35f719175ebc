"""Index codecs: sorted unique flat positions <-> bytes.

Four codecs, one registry (`INDEX_CODECS`), plus `auto`, which predicts every codec's size
from the data (cheap, vectorized) and encodes with the smallest:

- `raw`    fixed-width little-endian uint32 (uint64 when numel > 2**32): 32 bits per index.
- `bitmap` one bit per position of the dense tensor: numel/8 bytes whatever k is; wins only
           at high density (above roughly 1/5 for uniformly spread indices).
- `varint` gaps (idx[i] - idx[i-1] - 1) as unsigned LEB128, 7 payload bits per byte.
- `rice`   gaps Golomb-Rice coded with parameter b chosen from the density
           (b ~ log2(mean gap * ln 2)) and refined by exact size over b-1..b+2. The b-bit
           remainders and the unary quotients are stored as two separate bit streams, not
           interleaved: the total size is identical, but both directions become pure numpy
           (a prefix sum to encode, `flatnonzero` over the unary bits to decode) with no
           per-element Python loop. For uniformly spread indices this is within ~1% of the
           information floor log2 C(n, k).

Every decoder validates what it reads (length, padding, count, range, order) and raises
`CodecError`; no decoder allocates more than a small constant times its input bytes, except
`bitmap`, whose input must already be numel/8 bytes long.
"""
from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from .errors import CodecError


def information_floor_bits(n: int, k: int) -> float:
    """log2 C(n, k): the fewest bits that can name k positions out of n."""
    if k < 0 or k > n:
        raise ValueError(f"k={k} outside [0, n={n}]")
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def gaps_of(idx: np.ndarray) -> np.ndarray:
    """(k,) uint64 gaps: first index, then idx[i] - idx[i-1] - 1 (>= 0 for strictly increasing)."""
    g = np.empty(idx.size, dtype=np.uint64)
    if idx.size:
        g[0] = idx[0]
        np.subtract(idx[1:], idx[:-1], out=g[1:], casting="unsafe")
        g[1:] -= 1
    return g


def indices_from_gaps(g: np.ndarray, n: int) -> np.ndarray:
    """Inverse of `gaps_of`, validating that the result is strictly increasing and below n."""
    if g.size == 0:
        return np.empty(0, dtype=np.int64)
    if int(g.max()) >= n:
        raise CodecError(f"index gap {int(g.max())} is not below numel {n}")
    # uint64 arithmetic: each step adds at most n <= 2**48, so a wrap would show up as a
    # decrease, which the order check below rejects.
    idx = np.cumsum(g + np.uint64(1), dtype=np.uint64) - np.uint64(1)
    if idx.size > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise CodecError("decoded indices are not strictly increasing")
    if int(idx[-1]) >= n:
        raise CodecError(f"decoded index {int(idx[-1])} out of range for numel {n}")
    return idx.astype(np.int64)


class IndexCodec(Protocol):
    name: str

    def size_bytes(self, idx: np.ndarray, n: int) -> int: ...

    def encode(self, idx: np.ndarray, n: int) -> tuple[bytes, dict]: ...

    def decode(self, buf: memoryview, k: int, n: int, params: dict) -> np.ndarray: ...


def _check_sorted_in_range(idx: np.ndarray, n: int) -> np.ndarray:
    if idx.size > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise CodecError("decoded indices are not strictly increasing")
    if idx.size and (int(idx[0]) < 0 or int(idx[-1]) >= n):
        raise CodecError(f"decoded index out of range for numel {n}")
    return idx


class RawCodec:
    """Fixed-width uint32 (uint64 above 2**32 positions)."""

    name = "raw"

    @staticmethod
    def _width(n: int) -> int:
        return 4 if n <= 2**32 else 8

    def size_bytes(self, idx: np.ndarray, n: int) -> int:
        return idx.size * self._width(n)

    def encode(self, idx: np.ndarray, n: int) -> tuple[bytes, dict]:
        dt = "<u4" if self._width(n) == 4 else "<u8"
        return idx.astype(dt).tobytes(), {}

    def decode(self, buf: memoryview, k: int, n: int, params: dict) -> np.ndarray:
        w = self._width(n)
        if len(buf) != k * w:
            raise CodecError(f"raw index block is {len(buf)} bytes, expected {k} x {w}")
        raw = np.frombuffer(buf, dtype="<u4" if w == 4 else "<u8")
        if raw.size and int(raw.max()) >= n:
            raise CodecError(f"index {int(raw.max())} out of range for numel {n}")
        return _check_sorted_in_range(raw.astype(np.int64), n)


class BitmapCodec:
    """One bit per dense position, little bit order, padding bits zero."""

    name = "bitmap"

    def size_bytes(self, idx: np.ndarray, n: int) -> int:
        return (n + 7) // 8

    def encode(self, idx: np.ndarray, n: int) -> tuple[bytes, dict]:
        bits = np.zeros(n, dtype=np.uint8)
        bits[idx] = 1
        return np.packbits(bits, bitorder="little").tobytes(), {}

    def decode(self, buf: memoryview, k: int, n: int, params: dict) -> np.ndarray:
        if len(buf) != (n + 7) // 8:
            raise CodecError(f"bitmap block is {len(buf)} bytes, expected {(n + 7) // 8} for numel {n}")
        bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")
        idx = np.flatnonzero(bits)
        if idx.size != k:
            raise CodecError(f"bitmap has {idx.size} set bits, header says k={k}")
        if idx.size and int(idx[-1]) >= n:
            raise CodecError("bitmap padding bits are set")
        return idx.astype(np.int64)


_MAX_LEB128_BYTES = 10  # ceil(64 / 7)


class VarintCodec:
    """Gaps as unsigned LEB128 (little-endian base-128, high bit = more bytes follow)."""

    name = "varint"

    @staticmethod
    def _lengths(g: np.ndarray) -> np.ndarray:
        nbytes = np.ones(g.size, dtype=np.int64)
        for j in range(1, _MAX_LEB128_BYTES):
            nbytes += g >= np.uint64(1 << (7 * j))
        return nbytes

    def size_bytes(self, idx: np.ndarray, n: int) -> int:
        return int(self._lengths(gaps_of(idx)).sum())

    def encode(self, idx: np.ndarray, n: int) -> tuple[bytes, dict]:
        g = gaps_of(idx)
        nbytes = self._lengths(g)
        starts = np.cumsum(nbytes) - nbytes
        out = np.zeros(int(nbytes.sum()), dtype=np.uint8)
        for j in range(int(nbytes.max()) if g.size else 0):  # loop over byte positions, not elements
            m = nbytes > j
            byte = (g[m] >> np.uint64(7 * j)) & np.uint64(0x7F)
            more = (nbytes[m] > j + 1).astype(np.uint64) << np.uint64(7)
            out[starts[m] + j] = (byte | more).astype(np.uint8)
        return out.tobytes(), {}

    def decode(self, buf: memoryview, k: int, n: int, params: dict) -> np.ndarray:
        b = np.frombuffer(buf, dtype=np.uint8)
        ends = np.flatnonzero(b < 0x80)  # the last byte of every varint
        if ends.size != k:
            raise CodecError(f"varint block holds {ends.size} values, header says k={k}")
        if k == 0:
            if b.size:
                raise CodecError("varint block has bytes but k=0")
            return np.empty(0, dtype=np.int64)
        if int(ends[-1]) != b.size - 1:
            raise CodecError("varint block ends inside a value")
        starts = np.empty_like(ends)
        starts[0] = 0
        starts[1:] = ends[:-1] + 1
        lens = ends - starts + 1
        if int(lens.max()) > _MAX_LEB128_BYTES:
            raise CodecError("varint longer than 10 bytes")
        g = np.zeros(k, dtype=np.uint64)
        for j in range(int(lens.max())):
            m = lens > j
            g[m] |= (b[starts[m] + j] & 0x7F).astype(np.uint64) << np.uint64(7 * j)
        return indices_from_gaps(g, n)


_MAX_RICE_B = 62


class RiceCodec:
    """Golomb-Rice coded gaps: [k x b-bit remainders][unary quotients: q zeros then a one]."""

    name = "rice"

    @staticmethod
    def initial_b(n: int, k: int) -> int:
        """Rice parameter from the density alone: b ~ log2(mean gap * ln 2)."""
        if k == 0:
            return 0
        mean_gap = max((n - k) / k, 1e-9)
        return int(min(_MAX_RICE_B, max(0, math.floor(math.log2(mean_gap * math.log(2)) + 0.5))))

    @staticmethod
    def _bits(g: np.ndarray, b: int) -> int:
        return g.size * (b + 1) + int((g >> np.uint64(b)).sum())

    def best_b(self, g: np.ndarray, n: int) -> tuple[int, int]:
        """(b, size in bits) minimising the exact coded size around the density estimate."""
        b0 = self.initial_b(n, g.size)
        cands = [b for b in range(b0 - 1, b0 + 3) if 0 <= b <= _MAX_RICE_B]
        return min(((b, self._bits(g, b)) for b in cands), key=lambda t: t[1])

    def size_bytes(self, idx: np.ndarray, n: int) -> int:
        g = gaps_of(idx)
        b, _ = self.best_b(g, n)
        return (g.size * b + 7) // 8 + (int((g >> np.uint64(b)).sum()) + g.size + 7) // 8

    def encode(self, idx: np.ndarray, n: int) -> tuple[bytes, dict]:
        g = gaps_of(idx)
        b, _ = self.best_b(g, n)
        k = g.size
        # remainders: a (k, b) bit matrix, most significant bit first, one pass per bit plane
        rbits = np.empty((k, b), dtype=np.uint8)
        low = (g & np.uint64((1 << b) - 1)).astype(np.uint32) if b <= 32 else g  # narrow, as in decode
        one = low.dtype.type(1)
        for j in range(b):
            rbits[:, j] = (low >> low.dtype.type(b - 1 - j)) & one
        rem = np.packbits(rbits.reshape(-1))
        # unary quotients: q zeros then a one, so the ones sit at cumsum(q + 1) - 1
        q = (g >> np.uint64(b)).astype(np.int64)
        ones_at = np.cumsum(q + 1) - 1
        ubits = np.zeros(int(ones_at[-1]) + 1 if k else 0, dtype=np.uint8)
        ubits[ones_at] = 1
        return rem.tobytes() + np.packbits(ubits).tobytes(), {"b": b}

    def decode(self, buf: memoryview, k: int, n: int, params: dict) -> np.ndarray:
        b = params.get("b")
        if type(b) is not int or not 0 <= b <= _MAX_RICE_B:
            raise CodecError(f"rice parameter b={b!r} is not an int in [0, {_MAX_RICE_B}]")
        rem_bytes = (k * b + 7) // 8
        if len(buf) < rem_bytes:
            raise CodecError(f"rice block is {len(buf)} bytes, remainders alone need {rem_bytes}")
        if k == 0:
            if len(buf):
                raise CodecError("rice block has bytes but k=0")
            return np.empty(0, dtype=np.int64)
        raw = np.frombuffer(buf, dtype=np.uint8)
        rbits = np.unpackbits(raw[:rem_bytes])[: k * b].reshape(k, b)
        # one shift-or per bit plane, in the narrowest integer that holds b bits (uint32 is ~4x
        # faster than uint64 here: the strided column is widened to the accumulator's type)
        r = np.zeros(k, dtype=np.uint32 if b <= 32 else np.uint64)
        for j in range(b):
            r <<= 1
            r |= rbits[:, j]
        r = r.astype(np.uint64, copy=False)
        ubytes = raw[rem_bytes:]
        ones_at = np.nonzero(np.unpackbits(ubytes).view(bool))[0]  # bits are 0/1: no != 0 pass (~10x)
        if ones_at.size != k:
            raise CodecError(f"rice unary stream holds {ones_at.size} values, header says k={k}")
        if ubytes.size != (int(ones_at[-1]) + 1 + 7) // 8:
            raise CodecError("rice unary stream has trailing bytes")
        q = np.empty_like(ones_at)  # zeros before each one (np.diff with prepend costs ~10x this here)
        q[0] = ones_at[0]
        np.subtract(ones_at[1:], ones_at[:-1], out=q[1:])
        q[1:] -= 1
        if int(q.max()) > (n >> b):
            raise CodecError(f"rice quotient {int(q.max())} too large for numel {n}")
        g = (q.astype(np.uint64) << np.uint64(b)) | r
        return indices_from_gaps(g, n)


INDEX_CODECS: dict[str, IndexCodec] = {c.name: c for c in (RawCodec(), BitmapCodec(), VarintCodec(), RiceCodec())}


def choose_index_codec(idx: np.ndarray, n: int) -> str:
    """The registered codec with the smallest encoded size for these indices (`auto`)."""
    sizes = {name: codec.size_bytes(idx, n) for name, codec in INDEX_CODECS.items() if name != "bitmap" or n < 2**36}
    return min(sizes, key=sizes.get)
