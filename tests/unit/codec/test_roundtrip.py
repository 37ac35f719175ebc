"""decode(encode(x)) == x for every index and value codec, on edge cases and random deltas."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsecomm import SparseDelta
from sparsecomm.codec import (INDEX_CODECS, VALUE_CODECS, CodecError, decode, decode_model, encode, encode_model,
                              information_floor_bits, roundtrip_values)
from sparsecomm.codec.index import RiceCodec

INDEX = sorted(INDEX_CODECS) + ["auto"]
VALUE = sorted(VALUE_CODECS)


def make_delta(numel, k, shape=None, seed=0, dtype=torch.float32, step=3, base=7):
    g = torch.Generator().manual_seed(seed)
    idx = torch.sort(torch.randperm(numel, generator=g)[:k]).values if numel < 10**7 else \
        torch.unique(torch.randint(numel, (k,), generator=g))
    vals = torch.randn(idx.numel(), generator=g).to(dtype)
    return SparseDelta(idx, vals, tuple(shape or (numel,)), dtype, step=step, base_version=base)


def assert_roundtrip(d, index, value):
    got = decode(encode(d, index, value))
    want = roundtrip_values(d, value)
    assert got.shape == d.shape and got.dtype == d.dtype
    assert got.step == d.step and got.base_version == d.base_version
    assert torch.equal(got.indices, d.indices)
    assert torch.equal(got.values, want.values)


@pytest.mark.parametrize("index", INDEX)
@pytest.mark.parametrize("value", VALUE)
@pytest.mark.parametrize("numel,k", [(0, 0), (1, 0), (1, 1), (100, 0), (100, 100), (1000, 1), (1000, 999), (4096, 40)])
def test_edge_cases(index, value, numel, k):
    if index == "bitmap" and numel == 0:
        pass  # a bitmap of zero positions is zero bytes: still valid
    assert_roundtrip(make_delta(numel, k), index, value)


@pytest.mark.parametrize("index", ["raw", "varint", "rice", "auto"])
def test_huge_shape_tiny_k(index):
    # 10**12 positions, 5 entries: nothing proportional to numel may be allocated
    d = SparseDelta(torch.tensor([0, 17, 10**9, 10**11 + 3, 10**12 - 1]), torch.arange(5.0), (10**6, 10**6))
    assert_roundtrip(d, index, "fp32")


@given(numel=st.integers(1, 5000), data=st.data(), index=st.sampled_from(INDEX), value=st.sampled_from(VALUE),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
def test_random_roundtrip(numel, data, index, value, dtype):
    k = data.draw(st.integers(0, numel))
    seed = data.draw(st.integers(0, 2**16))
    assert_roundtrip(make_delta(numel, k, seed=seed, dtype=dtype), index, value)


def test_multi_tensor_message_keeps_names_order_and_shapes():
    deltas = {"a.weight": make_delta(600, 6, (20, 30)), "b.bias": make_delta(30, 30), "empty": make_delta(5, 0)}
    got = decode_model(encode_model(deltas, "auto", "fp32", step=11, base_version=4))
    assert list(got) == list(deltas)
    for name, d in deltas.items():
        assert got[name].shape == d.shape and got[name].step == 11 and got[name].base_version == 4
        assert torch.equal(got[name].to_dense(), d.to_dense())


def test_decode_single_refuses_multi_tensor_message():
    buf = encode_model({"a": make_delta(10, 2), "b": make_delta(10, 2)})
    with pytest.raises(CodecError, match="single-tensor"):
        decode(buf)


@pytest.mark.parametrize("density", [0.01, 0.001])
def test_auto_index_near_information_floor(density):
    numel = 2_000_000
    d = make_delta(numel, int(numel * density))
    idx = d.indices.numpy()
    ib, _ = INDEX_CODECS["rice"].encode(idx, numel)
    assert len(ib) * 8 <= 1.05 * information_floor_bits(numel, d.k)


def test_rice_parameter_follows_density():
    assert RiceCodec.initial_b(10**6, 10**4) == round(math.log2(99 * math.log(2)))
    assert RiceCodec.initial_b(10**6, 10**6) == 0


def test_auto_prefers_bitmap_when_dense():
    from sparsecomm.codec import choose_index_codec

    idx = np.arange(0, 1000, 2)  # density 0.5: one bit per position beats any gap code
    assert choose_index_codec(idx, 1000) == "bitmap"


def test_int8_error_is_bounded_by_half_a_step():
    d = make_delta(1000, 500)
    q = roundtrip_values(d, "int8").values
    scale = float(d.values.abs().max()) / 127
    assert float((q - d.values).abs().max()) <= scale / 2 * 1.0001


@pytest.mark.parametrize("value", VALUE)
def test_non_finite_values_are_refused(value):
    d = make_delta(10, 3)
    d.values[1] = float("nan")
    with pytest.raises(CodecError, match="NaN"):
        encode(d, "raw", value)


def test_fp16_overflow_is_refused():
    d = SparseDelta(torch.tensor([0]), torch.tensor([1e6]), (4,))
    with pytest.raises(CodecError):
        encode(d, "raw", "fp16")


def test_unknown_codec_names():
    with pytest.raises(CodecError, match="unknown index codec"):
        encode(make_delta(10, 1), "zip")
    with pytest.raises(CodecError, match="unknown value codec"):
        encode(make_delta(10, 1), "raw", "fp8")


def test_encode_rejects_non_canonical_delta():
    bad = SparseDelta(torch.tensor([5, 2]), torch.tensor([1.0, 2.0]), (10,))
    with pytest.raises(CodecError, match="strictly increasing"):
        encode(bad)
