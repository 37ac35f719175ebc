"""Decoding hostile bytes: only CodecError, never a crash, a hang or a huge allocation."""
import struct
import zlib

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsecomm import SparseDelta
from sparsecomm.codec import CodecError, decode, decode_model, encode, encode_model

GOOD = {ic: encode(SparseDelta(torch.tensor([1, 5, 9, 300]), torch.tensor([1.0, -2.0, 3.0, 0.5]), (20, 20)), ic, vc)
        for ic, vc in [("raw", "fp32"), ("bitmap", "bf16"), ("varint", "fp16"), ("rice", "int8")]}


def frame(header: dict, body: bytes = b"") -> bytes:
    """A message with valid checksums around arbitrary (hostile) contents."""
    h = msgpack.packb(header)
    return struct.pack("<4sII", b"SPCD", len(h), zlib.crc32(h)) + h + body


def entry(**over):
    e = {"name": "w", "shape": [400], "dtype": "float32", "k": 2, "ic": "raw", "ip": {}, "ib": 8,
         "vc": "fp32", "vp": {}, "vb": 8}
    e.update(over)
    return e


def msg(entries, body, **over):
    h = {"v": 1, "step": 0, "base": 0, "crc": zlib.crc32(body), "t": entries}
    h.update(over)
    return frame(h, body)


BODY = struct.pack("<2I", 3, 7) + struct.pack("<2f", 1.0, 2.0)


def test_valid_crafted_message_decodes():
    d = decode(msg([entry()], BODY))
    assert d.indices.tolist() == [3, 7] and d.values.tolist() == [1.0, 2.0]


@pytest.mark.parametrize("case,match", [
    (dict(entries=[entry(shape=[10**6, 10**6], k=10**12)]), "cannot hold|not an int"),
    (dict(entries=[entry(k=3)]), "cannot hold"),
    (dict(entries=[entry(shape=[1])]), "not an int in"),
    (dict(entries=[entry(shape=[-4])]), "shape"),
    (dict(entries=[entry(shape=[2] * 9)]), "shape"),
    (dict(entries=[entry(shape=[2**40, 2**40])]), "over the limit"),
    (dict(entries=[entry(dtype="int64")]), "dtype"),
    (dict(entries=[entry(ic="zip")]), "unknown index codec"),
    (dict(entries=[entry(vc="fp8")]), "unknown value codec"),
    (dict(entries=[entry(k=True)]), "not an int"),
    (dict(entries=[entry(name=7)]), "name"),
    (dict(entries=[entry(), entry()], body=BODY + BODY), "duplicate name"),
    (dict(entries=[entry(ib=4, vb=12)]), "cannot hold"),
    (dict(entries=[entry(ic="bitmap", ib=8)]), "bitmap block"),
    (dict(entries=[entry(shape=[5])]), "out of range"),
    (dict(entries=[entry()], body=struct.pack("<2I", 7, 3) + BODY[8:]), "strictly increasing"),
    (dict(entries=[entry()], body=struct.pack("<2I", 3, 3) + BODY[8:]), "strictly increasing"),
    (dict(entries=[entry()], body=BODY[:12]), "cannot hold|add up"),
    (dict(entries=[entry()], body=BODY + b"\0"), "add up"),
    (dict(entries=[entry(vc="int8", vb=2, vp={"scale": -1.0})], body=BODY[:10]), "scale"),
    (dict(entries=[entry(vc="int8", vb=2, vp={"scale": float("nan")})], body=BODY[:10]), "scale"),
    (dict(entries=[entry(ic="rice", ip={"b": 99})]), "rice parameter"),
    (dict(entries=[entry(ic="rice", ip={"b": "x"})]), "rice parameter"),
    (dict(entries=[entry(ip=[1, 2])]), "small map"),
    (dict(entries="nope"), "not a list"),
    (dict(entries=[entry()], v=2), "format version"),
    (dict(entries=[entry()], step="1"), "step"),
])
def test_hostile_headers(case, match):
    with pytest.raises(CodecError, match=match):
        decode_model(msg(case["entries"], case.get("body", BODY), **{k: v for k, v in case.items() if k not in ("entries", "body")}))


def test_nan_values_from_a_peer_are_refused():
    body = struct.pack("<2I", 3, 7) + struct.pack("<2f", 1.0, float("nan"))
    with pytest.raises(CodecError, match="NaN"):
        decode(msg([entry()], body))


def test_values_that_overflow_the_declared_dtype_are_refused():
    """A finite fp32 value in a tensor declared bf16 (or fp16) that rounds to infinity there, and an int8
    block whose scale x 127 overflows: refused, not decoded into inf (the ZeRO-3 relay stored one once)."""
    body = struct.pack("<2I", 3, 7) + struct.pack("<2f", 1.0, 3.4e38)
    for dtype in ("bfloat16", "float16"):
        with pytest.raises(CodecError, match="NaN or infinity"):
            decode(msg([entry(dtype=dtype)], body))
    assert decode(msg([entry()], body)).values[1] == torch.tensor(3.4e38)  # fine as fp32
    int8 = struct.pack("<2I", 3, 7) + struct.pack("<2b", 1, 127)
    with pytest.raises(CodecError, match="NaN or infinity"):
        decode(msg([entry(vc="int8", vp={"scale": float(np.float32(3.0e38))}, vb=2)], int8))


def test_rice_unary_stream_cannot_claim_huge_quotients():
    # b=0, k=1: one unary value of 10**6 zeros would need 125 kB; only what is sent is read
    body = bytes([0] * 16 + [1])  # 128 zeros then a one
    with pytest.raises(CodecError):
        decode(msg([entry(ic="rice", ip={"b": 0}, k=1, ib=len(body), vb=4, shape=[100])], body + struct.pack("<f", 1.0)))


def test_varint_cannot_be_overlong():
    body = bytes([0xFF] * 11 + [0x01]) + struct.pack("<f", 1.0)
    with pytest.raises(CodecError):
        decode(msg([entry(ic="varint", k=1, ib=12, vb=4, shape=[2**40])], body))


def test_header_length_limit_before_reading():
    with pytest.raises(CodecError, match="exceeds the limit"):
        decode(struct.pack("<4sII", b"SPCD", 2**31, 0))


@pytest.mark.parametrize("raw", [b"", b"SPC", b"XXXXXXXXXXXXXXXX", b"SPCD" + b"\0" * 8, b"SPCD\x01\0\0\0\0\0\0\0\xc1"])
def test_garbage(raw):
    with pytest.raises(CodecError):
        decode(raw)


@given(st.binary(max_size=512))
def test_random_bytes_only_codec_error(raw):
    with pytest.raises(CodecError):
        decode_model(raw)


@given(which=st.sampled_from(sorted(GOOD)), cut=st.integers(0, 10**6))
def test_truncation_only_codec_error(which, cut):
    buf = GOOD[which]
    with pytest.raises(CodecError):
        decode_model(buf[: cut % len(buf)])


@given(which=st.sampled_from(sorted(GOOD)), pos=st.integers(0, 10**6), bit=st.integers(0, 7))
def test_bit_flip_only_codec_error(which, pos, bit):
    buf = bytearray(GOOD[which])
    buf[pos % len(buf)] ^= 1 << bit
    with pytest.raises(CodecError):
        decode_model(bytes(buf))


@given(which=st.sampled_from(sorted(GOOD)), body=st.binary(max_size=64))
def test_random_body_behind_valid_checksums_only_codec_error(which, body):
    """Past the CRCs: a valid header with a random body and a matching body CRC."""
    header = msgpack.unpackb(GOOD[which][12:12 + struct.unpack_from("<I", GOOD[which], 4)[0]])
    header["crc"] = zlib.crc32(body)
    try:
        d = decode_model(frame(header, body))
    except CodecError:
        return
    for delta in d.values():  # if it decodes, it must be a canonical delta
        delta.validate()
