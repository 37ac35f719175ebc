"""Framed messages: one or more named SparseDeltas <-> bytes.

Wire format (version 1), all integers little-endian:

    offset 0   4 bytes   magic b"SPCD"
    offset 4   u32       header length H (at most Limits.max_header_bytes)
    offset 8   u32       CRC-32 of the header bytes
    offset 12  H bytes   msgpack header (below)
    then       body      per tensor: index block, then value block, in header order

    header = {"v": 1, "step": int, "base": int, "crc": CRC-32 of the body,
              "t": [{"name": str, "shape": [int, ...], "dtype": "float32" | ...,
                     "k": int, "ic": index codec, "ip": {params}, "ib": index bytes,
                     "vc": value codec, "vp": {params}, "vb": value bytes}, ...]}

Both CRCs together cover every byte after the magic, so a flipped bit anywhere is a
`CodecError`. Beyond checksums, every field is type- and range-checked against `Limits`
before anything is allocated, block sizes must add up to the body length exactly, and the
index and value decoders check counts, order and range: a header that claims 10**12
elements with a 20-byte body is rejected up front.

Bytes counted by trackers are `len(encode_*(...))`: header and framing included.
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Mapping

import msgpack
import numpy as np
import torch

from ..delta import DTYPE_NAMES, DTYPES, SparseDelta
from .errors import CodecError
from .index import INDEX_CODECS, choose_index_codec
from .values import VALUE_CODECS

MAGIC = b"SPCD"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sII")


@dataclass(frozen=True)
class Limits:
    """Upper bounds a decoder enforces before allocating anything."""

    max_header_bytes: int = 16 << 20
    max_tensors: int = 1 << 16
    max_ndim: int = 8
    max_numel: int = 1 << 48  # a shape may be huge (sparse deltas of huge tensors are fine) ...
    max_name_chars: int = 1024
    max_body_bytes: int = 1 << 36  # ... but the bytes that back it must actually be there


DEFAULT_LIMITS = Limits()


def _index_array(delta: SparseDelta) -> np.ndarray:
    return delta.indices.detach().to("cpu", torch.int64).numpy()


def encode_model(
    deltas: Mapping[str, SparseDelta],
    index: str = "auto",
    value: str = "fp32",
    step: int = 0,
    base_version: int = 0,
) -> bytes:
    """Encode named deltas into one framed message. `index="auto"` picks per tensor."""
    if value not in VALUE_CODECS:
        raise CodecError(f"unknown value codec {value!r}; choose from {sorted(VALUE_CODECS)}")
    if index != "auto" and index not in INDEX_CODECS:
        raise CodecError(f"unknown index codec {index!r}; choose from {sorted(INDEX_CODECS) + ['auto']}")
    vcodec = VALUE_CODECS[value]
    entries, blocks = [], []
    for name, d in deltas.items():
        try:
            d.validate()
        except ValueError as e:
            raise CodecError(f"tensor {name!r}: {e}") from None
        idx = _index_array(d)
        ic = choose_index_codec(idx, d.numel) if index == "auto" else index
        ib, ip = INDEX_CODECS[ic].encode(idx, d.numel)
        vb, vp = vcodec.encode(d.values)
        entries.append({"name": name, "shape": list(d.shape), "dtype": DTYPE_NAMES[d.dtype], "k": d.k,
                        "ic": ic, "ip": ip, "ib": len(ib), "vc": value, "vp": vp, "vb": len(vb)})
        blocks += [ib, vb]
    body = b"".join(blocks)
    header = msgpack.packb({"v": FORMAT_VERSION, "step": int(step), "base": int(base_version),
                            "crc": zlib.crc32(body), "t": entries})
    return _PREFIX.pack(MAGIC, len(header), zlib.crc32(header)) + header + body


def encode(delta: SparseDelta, index: str = "auto", value: str = "fp32") -> bytes:
    """Encode one delta (its step and base_version travel in the header)."""
    return encode_model({"": delta}, index, value, delta.step, delta.base_version)


def roundtrip_values(delta: SparseDelta, value: str) -> SparseDelta:
    """The delta exactly as a receiver will decode it (what error feedback must subtract)."""
    if value not in VALUE_CODECS:
        raise CodecError(f"unknown value codec {value!r}")
    return delta.with_values(VALUE_CODECS[value].roundtrip(delta.values))


# ----------------------------------------------------------------------------------- decode

def _int(entry: dict, key: str, lo: int, hi: int, where: str) -> int:
    v = entry.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise CodecError(f"{where}: field {key!r}={v!r} is not an int in [{lo}, {hi}]")
    return v


def _params(entry: dict, key: str, where: str) -> dict:
    p = entry.get(key)
    if not isinstance(p, dict) or len(p) > 8:
        raise CodecError(f"{where}: field {key!r} is not a small map")
    return p


def _read_header(buf: memoryview, limits: Limits) -> tuple[dict, int]:
    if len(buf) < _PREFIX.size:
        raise CodecError(f"message is {len(buf)} bytes, shorter than the {_PREFIX.size}-byte prefix")
    magic, hlen, hcrc = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CodecError(f"bad magic {bytes(magic)!r}: not a sparsecomm message")
    if hlen > limits.max_header_bytes:
        raise CodecError(f"header length {hlen} exceeds the limit {limits.max_header_bytes}")
    end = _PREFIX.size + hlen
    if len(buf) < end:
        raise CodecError(f"message truncated inside the header ({len(buf)} < {end} bytes)")
    hbytes = buf[_PREFIX.size:end]
    if zlib.crc32(hbytes) != hcrc:
        raise CodecError("header checksum mismatch (corrupted message)")
    try:
        header = msgpack.unpackb(hbytes, raw=False, strict_map_key=True, max_str_len=limits.max_name_chars * 4,
                                 max_bin_len=0, max_array_len=limits.max_tensors,
                                 max_map_len=max(64, limits.max_tensors), max_ext_len=0)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise CodecError(f"header is not valid msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(header, dict):
        raise CodecError("header is not a map")
    return header, end


def decode_model(buf: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> dict[str, SparseDelta]:
    """Decode a framed message into {name: SparseDelta}; raise CodecError on any defect."""
    buf = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf.cast("B")
    header, body_at = _read_header(buf, limits)
    if header.get("v") != FORMAT_VERSION:
        raise CodecError(f"unsupported format version {header.get('v')!r} (this build reads {FORMAT_VERSION})")
    step = _int(header, "step", -(2**63), 2**63 - 1, "header")
    base = _int(header, "base", -(2**63), 2**63 - 1, "header")
    crc = _int(header, "crc", 0, 2**32 - 1, "header")
    entries = header.get("t")
    if not isinstance(entries, list):
        raise CodecError("header field 't' is not a list")
    body = buf[body_at:]
    if len(body) > limits.max_body_bytes:
        raise CodecError(f"body of {len(body)} bytes exceeds the limit {limits.max_body_bytes}")

    # Pass 1: validate every entry and the block sizes before decoding (allocating) anything.
    plan, total, names = [], 0, set()
    for i, e in enumerate(entries):
        where = f"tensor #{i}"
        if not isinstance(e, dict):
            raise CodecError(f"{where}: entry is not a map")
        name = e.get("name")
        if not isinstance(name, str) or len(name) > limits.max_name_chars:
            raise CodecError(f"{where}: name is not a string of at most {limits.max_name_chars} chars")
        where = f"tensor {name!r}"
        if name in names:
            raise CodecError(f"{where}: duplicate name")
        names.add(name)
        shape = e.get("shape")
        if not isinstance(shape, list) or len(shape) > limits.max_ndim or any(type(s) is not int or s < 0 for s in shape):
            raise CodecError(f"{where}: shape {shape!r} is not a list of at most {limits.max_ndim} non-negative ints")
        numel = math.prod(shape)
        if numel > limits.max_numel:
            raise CodecError(f"{where}: shape {shape} has {numel} elements, over the limit {limits.max_numel}")
        if e.get("dtype") not in DTYPES:
            raise CodecError(f"{where}: dtype {e.get('dtype')!r} not one of {sorted(DTYPES)}")
        if e.get("ic") not in INDEX_CODECS:
            raise CodecError(f"{where}: unknown index codec {e.get('ic')!r}")
        if e.get("vc") not in VALUE_CODECS:
            raise CodecError(f"{where}: unknown value codec {e.get('vc')!r}")
        k = _int(e, "k", 0, numel, where)
        ib = _int(e, "ib", 0, len(body), where)
        vb = _int(e, "vb", 0, len(body), where)
        if vb != VALUE_CODECS[e["vc"]].value_bytes(k):
            raise CodecError(f"{where}: value block of {vb} bytes cannot hold k={k} {e['vc']} values")
        if e["ic"] == "bitmap" and ib != (numel + 7) // 8:
            raise CodecError(f"{where}: bitmap block of {ib} bytes does not match numel {numel}")
        plan.append((name, tuple(shape), numel, DTYPES[e["dtype"]], k, e["ic"], _params(e, "ip", where),
                     total, ib, e["vc"], _params(e, "vp", where), total + ib, vb))
        total += ib + vb
    if total != len(body):
        raise CodecError(f"blocks add up to {total} bytes but the body has {len(body)} (truncated or padded)")
    if zlib.crc32(body) != crc:
        raise CodecError("body checksum mismatch (corrupted message)")

    # Pass 2: decode.
    out: dict[str, SparseDelta] = {}
    for name, shape, numel, dtype, k, ic, ip, i0, ib, vc, vp, v0, vb in plan:
        try:
            idx = INDEX_CODECS[ic].decode(body[i0:i0 + ib], k, numel, ip)
            vals = VALUE_CODECS[vc].decode(body[v0:v0 + vb], k, vp, dtype)
        except CodecError as err:
            raise CodecError(f"tensor {name!r}: {err}") from None
        except (ValueError, TypeError, OverflowError, IndexError) as err:  # last line of defence
            raise CodecError(f"tensor {name!r}: malformed {ic}/{vc} block: {err}") from None
        out[name] = SparseDelta(torch.from_numpy(idx), vals, shape, dtype, step=step, base_version=base)
    return out


def decode(buf: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> SparseDelta:
    """Decode a message holding exactly one delta (as written by `encode`)."""
    deltas = decode_model(buf, limits)
    if len(deltas) != 1:
        raise CodecError(f"expected a single-tensor message, got {len(deltas)} tensors")
    return next(iter(deltas.values()))
