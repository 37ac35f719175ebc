"""int4 / int2 value codecs (sparsecomm/codec/values.py): exact round trip of what receivers decode,
closure under subsets (the split path re-encodes pieces of a roundtripped delta), error feedback
keeps the quantisation error, and bad or truncated payloads are a CodecError."""
import struct
import zlib

import msgpack
import pytest
import torch

from sparsecomm import SparseDelta
from sparsecomm.codec import VALUE_CODECS, CodecError, decode, encode, roundtrip_values
from sparsecomm.exchange import DenseSink, SparseExchange
from sparsecomm.exchange.paths import predicted_bytes

LOWBIT = ("int4", "int2")


def _values(seed: int, n: int, scale: float = 1e-3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * scale * torch.exp(torch.randn(n, generator=g))  # heavy-ish tails


@pytest.mark.parametrize("name", LOWBIT)
@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 5, 7, 1000, 1001])
def test_decode_equals_roundtrip_bit_for_bit(name, k):
    idx = torch.arange(k) * 3
    d = SparseDelta(idx, _values(k, k), (3 * k + 1,))
    sent = roundtrip_values(d, name)
    got = decode(encode(d, "auto", name))
    assert torch.equal(got.values, sent.values) and torch.equal(got.indices, d.indices)
    codec = VALUE_CODECS[name]
    assert len(codec.encode(d.values)[0]) == codec.value_bytes(k) == -(-k * codec.bits // 8)
    if k:
        levels = torch.unique(sent.values / 2.0 ** codec.encode(d.values)[1]["exp"])
        assert set(levels.tolist()) <= set(range(-codec.qmax, codec.qmax + 1))  # integers x one power of two


@pytest.mark.parametrize("name", LOWBIT)
def test_subsets_of_decoded_values_reencode_exactly(name):
    """The split all-reduce encodes shard pieces of the roundtripped delta: they must decode to the
    same bits, or owners would sum something other than what the workers removed from their residual."""
    codec = VALUE_CODECS[name]
    sent = codec.roundtrip(_values(1, 4000))
    g = torch.Generator().manual_seed(2)
    for _ in range(50):
        lo = int(torch.randint(0, 4000, (1,), generator=g))
        hi = lo + int(torch.randint(0, 4000 - lo + 1, (1,), generator=g))
        piece = sent[lo:hi]
        assert torch.equal(codec.roundtrip(piece), piece)
    assert torch.equal(codec.roundtrip(sent), sent)  # idempotent


def test_int4_does_not_clip_and_int2_is_ternary():
    v = _values(3, 5000)
    q4 = VALUE_CODECS["int4"].roundtrip(v)
    assert float((q4 - v).abs().max()) <= 2.0 ** VALUE_CODECS["int4"].encode(v)[1]["exp"] / 2  # half a step at most
    q2 = VALUE_CODECS["int2"].roundtrip(v)
    assert len(torch.unique(q2)) == 3 and torch.equal(torch.sign(q2[q2 != 0]), torch.sign(v[q2 != 0]))


@pytest.mark.parametrize("name", LOWBIT)
@pytest.mark.parametrize("path", ["allgather", "split"])
def test_error_feedback_keeps_the_quantisation_error(name, path):
    e = _values(4, 20000)
    before = e.clone()
    out = torch.zeros_like(e)
    ex = SparseExchange(value_codec=name, paths=(path,), selector="topk")
    ex.exchange("w", e, 200, DenseSink(out))
    assert int(torch.count_nonzero(out)) <= 200
    assert torch.equal(out + e, before)  # applied + residual == what the residual held, exactly in fp32
    assert not torch.equal(out[out != 0], before[out != 0])  # the values really were quantised


@pytest.mark.parametrize("name", LOWBIT)
def test_truncated_padded_and_bad_payloads_raise(name):
    d = SparseDelta(torch.tensor([1, 5, 9]), torch.tensor([1.0, -2.0, 3.0]), (20,))
    good = encode(d, "raw", name)
    for cut in (1, 5, len(good) - 1):
        with pytest.raises(CodecError):
            decode(good[:cut])
    with pytest.raises(CodecError):
        decode(good + b"\0")
    codec = VALUE_CODECS[name]
    vb, vp = codec.encode(d.values)
    for bad_params in ({"exp": 200}, {"exp": 1.5}, {}, {"exp": "0"}):
        with pytest.raises(CodecError, match="exponent"):
            codec.decode(memoryview(vb), 3, bad_params, torch.float32)
    with pytest.raises(CodecError, match="bytes"):
        codec.decode(memoryview(vb + b"\0"), 3, vp, torch.float32)
    most_negative = (1 << codec.bits) // 2  # two's complement -(qmax + 1): outside the symmetric range
    with pytest.raises(CodecError, match="symmetric"):
        codec.decode(memoryview(bytes([most_negative])), 1, vp, torch.float32)
    with pytest.raises(CodecError, match="padding"):
        codec.decode(memoryview(bytes([0xFF])), 1, vp, torch.float32)  # bits after the one value set


def test_crafted_header_with_wrong_value_block_size_is_refused():
    body = struct.pack("<I", 3) + b"\x07"
    entry = {"name": "w", "shape": [10], "dtype": "float32", "k": 1, "ic": "raw", "ip": {}, "ib": 4,
             "vc": "int4", "vp": {"exp": 0}, "vb": 2}  # one int4 value needs 1 byte, not 2
    h = msgpack.packb({"v": 1, "step": 0, "base": 0, "crc": zlib.crc32(body + b"\0"), "t": [entry]})
    with pytest.raises(CodecError, match="value block"):
        decode(struct.pack("<4sII", b"SPCD", len(h), zlib.crc32(h)) + h + body + b"\0")


def test_non_finite_values_are_refused():
    with pytest.raises(CodecError, match="NaN"):
        encode(SparseDelta(torch.tensor([0]), torch.tensor([float("nan")]), (4,)), "raw", "int4")


def test_byte_predictions_use_fractional_value_bytes():
    n, k = 10**6, 10**4
    b16 = predicted_bytes("allgather", n, k, 2, VALUE_CODECS["bf16"].bytes_per_value, "raw")
    b4 = predicted_bytes("allgather", n, k, 2, VALUE_CODECS["int4"].bytes_per_value, "raw")
    b2 = predicted_bytes("allgather", n, k, 2, VALUE_CODECS["int2"].bytes_per_value, "raw")
    assert b16 > b4 > b2 and b4 - b2 == pytest.approx(k * 0.25)
    measured = len(encode(SparseDelta(torch.arange(k) * 100, _values(5, k), (n,)), "raw", "int4"))
    assert abs(measured - b4) < 200  # the prediction is the real message size up to the header estimate
