"""Value codecs: the k values of a sparse delta <-> bytes.

| codec  | bytes/value | exact?                                                     |
|--------|-------------|------------------------------------------------------------|
| fp32   | 4           | exact for fp32 deltas                                      |
| bf16   | 2           | round-to-nearest-even to bfloat16                          |
| fp16   | 2           | round-to-nearest to float16 (|v| > 65504 is an error)      |
| int8   | 1 (+4 once) | symmetric per-tensor scale absmax/127, round to nearest    |
| int4   | 1/2         | symmetric [-7, 7] x one power-of-two scale per message     |
|        |             | (the smallest 2**e with 7 x 2**e >= absmax): no clipping   |
| int2   | 1/4         | ternary {-1, 0, +1} x one power-of-two scale per message:  |
|        |             | sign + shared scale 2**round(log2(median abs of nonzeros)) |
|        |             | (values above 1.5 x scale are clipped: error feedback      |
|        |             | keeps the rest)                                            |

The value block of k values is `codec.value_bytes(k)` bytes (int4/int2 pack 2/4 values a byte,
low bits first, padding bits zero); `bytes_per_value` may be fractional.

Lossy codecs are only safe under error feedback, and only if the feedback subtracts what the
receivers will actually decode: `roundtrip(values)` returns exactly that, bit for bit, without
serializing. int4 and int2 (low-bit values under error feedback, as in SparseLoCo) go one step
further: their power-of-two scale makes them closed under subsets, so re-encoding any subset of
decoded values (the split all-reduce cuts a roundtripped delta into shard pieces and encodes
each) decodes to the same bits. int4: a subset's absmax is no larger, so its scale 2**e' <= 2**e
and q x 2**(e - e') is an integer in [-7, 7]; int2: the nonzeros of a subset all have the same
magnitude 2**e, which is their median. A scale of absmax / 7 or of a mean would not be closed
(int8's absmax / 127 is not: a piece with a smaller absmax re-quantises). Non-finite values are
refused on both sides: a NaN in a delta is a bug upstream, and a NaN arriving from a peer would
poison every replica's weights.
"""
from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch

from .errors import CodecError


class ValueCodec(Protocol):
    name: str
    bytes_per_value: float
    closed_under_subsets: bool  # re-encoding a subset of decoded values decodes to the same bits

    def value_bytes(self, k: int) -> int: ...

    def roundtrip(self, values: torch.Tensor) -> torch.Tensor: ...

    def encode(self, values: torch.Tensor) -> tuple[bytes, dict]: ...

    def decode(self, buf: memoryview, k: int, params: dict, dtype: torch.dtype) -> torch.Tensor: ...


def _require_finite(values: torch.Tensor, what: str) -> None:
    if values.numel() and not bool(torch.isfinite(values).all()):
        raise CodecError(f"{what}: values contain NaN or infinity")


class _FloatCodec:
    """Cast to a float wire dtype and send its raw little-endian bits."""

    def __init__(self, name: str, wire: torch.dtype, bits_view: torch.dtype, np_view: str):
        self.name, self.wire, self.bits_view, self.np_view = name, wire, bits_view, np_view
        self.bytes_per_value = torch.finfo(wire).bits // 8
        self.closed_under_subsets = True  # a cast: value by value

    def value_bytes(self, k: int) -> int:
        return k * self.bytes_per_value

    def roundtrip(self, values: torch.Tensor) -> torch.Tensor:
        return values.to(self.wire).to(values.dtype)

    def encode(self, values: torch.Tensor) -> tuple[bytes, dict]:
        wire = values.detach().to("cpu", self.wire).contiguous()
        _require_finite(wire, f"{self.name} encode")  # also catches fp16 overflow to inf
        return wire.view(self.bits_view).numpy().tobytes(), {}

    def decode(self, buf: memoryview, k: int, params: dict, dtype: torch.dtype) -> torch.Tensor:
        if len(buf) != k * self.bytes_per_value:
            raise CodecError(f"{self.name} value block is {len(buf)} bytes, expected {k} x {self.bytes_per_value}")
        bits = torch.from_numpy(np.frombuffer(buf, dtype=self.np_view).copy())
        out = bits.view(self.wire)
        _require_finite(out, f"{self.name} decode")
        res = out.to(dtype)
        if torch.finfo(dtype).max < torch.finfo(self.wire).max:  # a narrowing cast can overflow to inf
            _require_finite(res, f"{self.name} decode into {dtype}")
        return res


class Int8Codec:
    """Symmetric int8 with one fp32 scale per tensor (sent in the header params)."""

    name = "int8"
    bytes_per_value = 1
    closed_under_subsets = False  # absmax / 127: a subset with a smaller absmax re-quantises

    @staticmethod
    def value_bytes(k: int) -> int:
        return k

    @staticmethod
    def _quantize(values: torch.Tensor) -> tuple[torch.Tensor, float]:
        v = values.detach().to(torch.float32)
        _require_finite(v, "int8 encode")
        absmax = float(v.abs().max()) if v.numel() else 0.0
        # the scale itself must be an fp32 number so that sender and receiver agree bit for bit
        scale = float(np.float32(absmax / 127.0)) if absmax > 0 else 1.0
        q = torch.round(v / scale).clamp_(-127, 127).to(torch.int8)
        return q, scale

    @staticmethod
    def _dequantize(q: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
        return (q.to(torch.float32) * torch.tensor(scale, dtype=torch.float32)).to(dtype)

    def roundtrip(self, values: torch.Tensor) -> torch.Tensor:
        q, scale = self._quantize(values)
        return self._dequantize(q, scale, values.dtype).to(values.device)

    def encode(self, values: torch.Tensor) -> tuple[bytes, dict]:
        q, scale = self._quantize(values.cpu())
        return q.numpy().tobytes(), {"scale": scale}

    def decode(self, buf: memoryview, k: int, params: dict, dtype: torch.dtype) -> torch.Tensor:
        scale = params.get("scale")
        if type(scale) is not float or not np.isfinite(scale) or scale <= 0 or float(np.float32(scale)) != scale:
            raise CodecError(f"int8 scale {scale!r} is not a positive finite fp32 number")
        if len(buf) != k:
            raise CodecError(f"int8 value block is {len(buf)} bytes, expected {k}")
        q = torch.from_numpy(np.frombuffer(buf, dtype=np.int8).copy())
        if q.numel() and int(q.min()) < -127:
            raise CodecError("int8 value -128 is outside the symmetric range")
        out = self._dequantize(q, scale, dtype)
        _require_finite(out, f"int8 decode into {dtype}")  # 127 x a huge scale overflows
        return out


# both 2**e and 2**-e are normal fp32 numbers in this range (a division by a scalar may run as a
# multiplication by its reciprocal, e.g. on CUDA), and 7 x 2**125 is still finite
_MIN_EXP, _MAX_EXP = -125, 125


class _PackedIntCodec:
    """Symmetric integers q in [-qmax, qmax] of `bits` bits each, times one power-of-two scale 2**exp
    (the header param "exp"). Decoded values q x 2**exp are exact in fp32 (a small integer times a
    power of two), so roundtrip, encode and decode agree bit for bit on any device."""

    def __init__(self, name: str, bits: int, scale_rule: str):
        self.name, self.bits, self.scale_rule = name, bits, scale_rule
        self.qmax = 2 ** (bits - 1) - 1
        self.per_byte = 8 // bits
        self.bytes_per_value = bits / 8
        self.closed_under_subsets = True  # power-of-two scale (module docstring)

    def value_bytes(self, k: int) -> int:
        return (k + self.per_byte - 1) // self.per_byte

    def _exponent(self, v: torch.Tensor) -> int:
        """The scale's exponent, from exact statistics only (max, median: elements of v), so the same
        values give the same exponent on CPU and CUDA."""
        mag = v.abs()
        if self.scale_rule == "absmax":  # smallest e with qmax x 2**e >= absmax: nothing is clipped
            target = float(mag.max()) if mag.numel() else 0.0
            if target == 0.0:
                return 0
            e = math.ceil(math.log2(target / self.qmax))
            while self.qmax * 2.0 ** (e - 1) >= target:
                e -= 1
            while self.qmax * 2.0 ** e < target:
                e += 1
        else:  # "median": the nearest power of two to the median magnitude of the nonzero values
            nz = mag[mag > 0]
            if not nz.numel():
                return 0
            e = round(math.log2(float(nz.median())))
        return min(max(e, _MIN_EXP), _MAX_EXP)

    def _quantize(self, values: torch.Tensor) -> tuple[torch.Tensor, int]:
        v = values.detach().to(torch.float32)
        _require_finite(v, f"{self.name} encode")
        exp = self._exponent(v)
        # exact: dividing by a power of two (or multiplying by its reciprocal) only shifts the exponent
        q = torch.round(v / 2.0 ** exp).clamp_(-self.qmax, self.qmax).to(torch.int8)
        return q, exp

    def _dequantize(self, q: torch.Tensor, exp: int, dtype: torch.dtype) -> torch.Tensor:
        return (q.to(torch.float32) * torch.tensor(2.0 ** exp, dtype=torch.float32, device=q.device)).to(dtype)

    def roundtrip(self, values: torch.Tensor) -> torch.Tensor:
        q, exp = self._quantize(values)
        return self._dequantize(q, exp, values.dtype)

    def encode(self, values: torch.Tensor) -> tuple[bytes, dict]:
        q, exp = self._quantize(values.cpu())
        codes = (q.numpy().astype(np.int16) & ((1 << self.bits) - 1)).astype(np.uint8)  # two's complement, `bits` wide
        codes = np.concatenate([codes, np.zeros(-len(codes) % self.per_byte, np.uint8)]).reshape(-1, self.per_byte)
        shifts = (np.arange(self.per_byte, dtype=np.uint8) * self.bits)
        packed = np.bitwise_or.reduce(codes << shifts, axis=1).astype(np.uint8)  # low bits first
        return packed.tobytes(), {"exp": exp}

    def decode(self, buf: memoryview, k: int, params: dict, dtype: torch.dtype) -> torch.Tensor:
        exp = params.get("exp")
        if type(exp) is not int or not _MIN_EXP <= exp <= _MAX_EXP:
            raise CodecError(f"{self.name} scale exponent {exp!r} is not an int in [{_MIN_EXP}, {_MAX_EXP}]")
        if len(buf) != self.value_bytes(k):
            raise CodecError(f"{self.name} value block is {len(buf)} bytes, expected {self.value_bytes(k)} for k={k}")
        packed = np.frombuffer(buf, dtype=np.uint8)
        shifts = (np.arange(self.per_byte, dtype=np.uint8) * self.bits)
        codes = ((packed[:, None] >> shifts) & ((1 << self.bits) - 1)).reshape(-1)
        if codes[k:].any():
            raise CodecError(f"{self.name} padding bits after the last of {k} values are not zero")
        codes = codes[:k].astype(np.int16)
        q = np.where(codes > self.qmax, codes - (1 << self.bits), codes)
        if q.size and int(q.min()) < -self.qmax:
            raise CodecError(f"{self.name} code {-(self.qmax + 1)} is outside the symmetric range")
        out = self._dequantize(torch.from_numpy(q.astype(np.int8)), exp, torch.float32)
        _require_finite(out, f"{self.name} decode")
        return out.to(dtype)


VALUE_CODECS: dict[str, ValueCodec] = {
    c.name: c
    for c in (
        _FloatCodec("fp32", torch.float32, torch.int32, "<i4"),
        _FloatCodec("bf16", torch.bfloat16, torch.int16, "<i2"),
        _FloatCodec("fp16", torch.float16, torch.int16, "<i2"),
        Int8Codec(),
        _PackedIntCodec("int4", 4, "absmax"),
        _PackedIntCodec("int2", 2, "median"),
    )
}
