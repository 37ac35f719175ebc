"""Value codecs: the k values of a sparse delta <-> bytes.

| codec  | bytes/value | exact?                                                     |
|--------|-------------|------------------------------------------------------------|
| fp32   | 4           | exact for fp32 deltas                                      |
| bf16   | 2           | round-to-nearest-even to bfloat16                          |
| fp16   | 2           | round-to-nearest to float16 (|v| > 65504 is an error)      |
| int8   | 1 (+4 once) | symmetric per-tensor scale absmax/127, round to nearest    |

Lossy codecs are only safe under error feedback, and only if the feedback subtracts what the
receivers will actually decode: `roundtrip(values)` returns exactly that, bit for bit, without
serializing. Non-finite values are refused on both sides: a NaN in a delta is a bug upstream,
and a NaN arriving from a peer would poison every replica's weights.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from .errors import CodecError


class ValueCodec(Protocol):
    name: str
    bytes_per_value: int

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
        return out.to(dtype)


class Int8Codec:
    """Symmetric int8 with one fp32 scale per tensor (sent in the header params)."""

    name = "int8"
    bytes_per_value = 1

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
        return self._dequantize(q, scale, dtype)


VALUE_CODECS: dict[str, ValueCodec] = {
    c.name: c
    for c in (
        _FloatCodec("fp32", torch.float32, torch.int32, "<i4"),
        _FloatCodec("bf16", torch.bfloat16, torch.int16, "<i2"),
        _FloatCodec("fp16", torch.float16, torch.int16, "<i2"),
        Int8Codec(),
    )
}
