"""mean_of_deltas: both strategies give the same bits; decode_all names a bad peer message."""
import pytest
import torch

from sparsecomm import SparseDelta
from sparsecomm.codec import CodecError, encode
from sparsecomm.exchange import decode_all, mean_of_deltas


def aggregate_mean(payloads, n):
    deltas = decode_all(payloads, n)
    return mean_of_deltas(deltas, n, sum(d.k for d in deltas))


def msg(numel, k, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.sort(torch.randperm(numel, generator=g)[:k]).values
    return encode(SparseDelta(idx, torch.randn(k, generator=g), (numel,)), "auto", "fp32")


def test_sparse_and_dense_strategies_agree_bitwise():
    n = 4000
    small = [msg(n, 50, s) for s in range(4)]  # 4 x 50 < n/8: union strategy
    big = [msg(n, 900, s) for s in range(4)]  # 4 x 900 > n/8: dense accumulation
    for payloads in (small, big):
        agg = aggregate_mean(payloads, n)
        ref = torch.zeros(n)
        for p in payloads:
            from sparsecomm.codec import decode
            ref += decode(p).to_dense()
        ref /= 4
        assert torch.equal(agg.to_dense(), ref)
        agg.validate()


def test_bad_peer_message_names_the_rank():
    good = msg(100, 5, 0)
    with pytest.raises(CodecError, match="rank 1"):
        aggregate_mean([good, good[:-3]], 100)
    with pytest.raises(CodecError, match="rank 1 has shape"):
        aggregate_mean([good, msg(50, 5, 1)], 100)
