"""Split sparse all-reduce (gloo, loopback) against dense references: exact, re-sparsified, faults.

One process group per world size runs every scenario (spawning costs more than the scenarios).
"""
import pytest
import torch
import torch.distributed as dist

from sparsecomm import SparseDelta
from sparsecomm.codec import CodecError, roundtrip_values
from sparsecomm.compress import TopK
from sparsecomm.exchange import DenseSink, SparseExchange, SplitAllReduce, TorchDistTransport
from sparsecomm.track import CommTracker
from tests.distributed.helpers import run_workers

pytestmark = pytest.mark.distributed


def delta_of(rank, n, k, seed):
    """A worker's selected delta: k distinct positions, bf16-representable values (a codec round trip)."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    idx = torch.sort(torch.randperm(n, generator=g)[:k]).values
    return roundtrip_values(SparseDelta(idx, torch.randn(k, generator=g), (n,)), "bf16")


def dense_sum(n, k, seed, ws):
    """The reference: sum of every rank's delta, densely, in rank order."""
    ref = torch.zeros(n)
    for r in range(ws):
        d = delta_of(r, n, k, seed)
        ref.index_add_(0, d.indices, d.values)
    return ref


def one_exchange(split, tr, d, k, value="bf16"):
    """Both phases + commit; returns the applied mean and the worker residual afterwards."""
    e = torch.zeros(d.numel)
    e[d.indices] = d.values  # the worker residual held exactly what it sends
    out = torch.zeros(d.numel)
    owners, alpha, commit = split.exchange(tr, e, d, k, "auto", value, CommTracker())
    for o in owners:
        o.add_to(out, alpha)
    commit()
    return out, e


def _scenarios(rank, ws):
    tr = TorchDistTransport()
    res = {}
    # exact mode, including an empty shard (all entries in the first half) and k=0
    for name, n, k in (("exact", 10_000, 300), ("exact_k0", 1000, 0), ("exact_tiny", ws - 1 if ws > 1 else 1, 1)):
        split = SplitAllReduce(n, ws, rank, exact=True)
        d = delta_of(rank, n, k, 1)
        out, e = one_exchange(split, tr, d, k)
        res[name] = (out, e, split.acc.clone())
    split = SplitAllReduce(10_000, ws, rank, exact=True)
    g = torch.Generator().manual_seed(rank)
    idx = torch.sort(torch.randperm(2_000, generator=g)[:200]).values  # shards 2.. get nothing
    d = SparseDelta(idx, torch.randn(200, generator=g).bfloat16().float(), (10_000,))
    res["uneven"] = one_exchange(split, tr, d, 200)[0], d
    # re-sparsified: each owner sends ceil(k/P) entries of its summed shard, keeps the rest
    split = SplitAllReduce(10_000, ws, rank, exact=False, owner_selector=TopK(), owner_share=1.0)
    d = delta_of(rank, 10_000, 300, 2)
    out, e = one_exchange(split, tr, d, 300, value="fp32")
    acc = torch.zeros(10_000)
    lo, hi = split.shard
    acc[lo:hi] = split.acc
    dist.all_reduce(acc)  # every owner's residual, placed at its shard
    res["resparsified"] = out, acc, int(torch.count_nonzero(out))
    # owner_share 2 (the default): each owner sends 2 x ceil(k/P) of its sum: more of the union applied
    split = SplitAllReduce(10_000, ws, rank, exact=False, owner_selector=TopK(), owner_share=2.0)
    out, e = one_exchange(split, tr, d, 300, value="fp32")
    acc = torch.zeros(10_000)
    acc[split.shard[0]:split.shard[1]] = split.acc
    dist.all_reduce(acc)
    res["share2"] = out, acc, int(torch.count_nonzero(out))
    # int8 values: each shard piece is quantised with its own scale; what leaves every worker's
    # residual must be what its owners decoded (summed over ranks: sent == applied x P + owners' residuals)
    split = SplitAllReduce(10_000, ws, rank, exact=False, owner_selector=TopK())
    e = torch.randn(10_000, generator=torch.Generator().manual_seed(50 + rank))
    d = roundtrip_values(TopK().select(e, 300), "int8")
    e_before, out = e.clone(), torch.zeros(10_000)
    owners, alpha, commit = split.exchange(tr, e, d, 300, "auto", "int8", CommTracker())
    for o in owners:
        o.add_to(out, alpha)
    commit()
    acc, sent = torch.zeros(10_000), e_before - e
    acc[split.shard[0]:split.shard[1]] = split.acc
    dist.all_reduce(acc)
    dist.all_reduce(sent)
    res["int8"] = out, acc, sent
    # a corrupt phase-1 piece from the last rank: every rank raises, nothing committed anywhere
    split = SplitAllReduce(10_000, ws, rank, exact=True)
    d = delta_of(rank, 10_000, 300, 3)
    e = torch.zeros(10_000)
    e[d.indices] = d.values
    e0 = e.clone()
    real = tr.all_to_all_bytes
    if rank == ws - 1:
        tr.all_to_all_bytes = lambda pieces: real([p[:-5] + b"junk!" for p in pieces])
    try:
        split.exchange(tr, e, d, 300, "auto", "bf16", CommTracker())
        res["corrupt"] = "no error"
    except CodecError as err:
        res["corrupt"] = str(err)
    tr.all_to_all_bytes = real
    res["corrupt_state"] = torch.equal(e, e0), int(torch.count_nonzero(split.acc))
    # ranks that disagree on the buffer size: a clear error on every rank, no hang
    n_bad = 5000 + (rank == 0)
    try:
        SparseExchange(tr, paths=("split",)).exchange("x", torch.randn(n_bad), 50, DenseSink(torch.zeros(n_bad)))
        res["sizes"] = "no error"
    except CodecError as err:
        res["sizes"] = str(err)
    return res


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_split_all_reduce_against_dense_references(tmp_path, world_size):
    res = run_workers(_scenarios, world_size, tmp_path)
    P = world_size
    for r in res:
        out, e, acc = r["exact"]
        ref = dense_sum(10_000, 300, 1, P) / P
        assert torch.equal(out, ref)  # exact mode: bit for bit the rank-order dense mean
        assert not e.any() and not acc.any()  # everything sent, nothing held back
        assert not r["exact_k0"][0].any()
        assert torch.equal(r["exact_tiny"][0], dense_sum(max(P - 1, 1), 1, 1, P) / P)
        out, _ = r["uneven"]
        ref = torch.zeros(10_000)
        for rr in res:
            ref.index_add_(0, rr["uneven"][1].indices, rr["uneven"][1].values)
        assert torch.equal(out, ref / P)
        # re-sparsified: applied (x P) + owners' residuals = the dense sum; P owners x ceil(k/P) entries sent
        out, owner_res, nnz = r["resparsified"]
        total = dense_sum(10_000, 300, 2, P)
        torch.testing.assert_close(out * P + owner_res, total, rtol=0, atol=1e-6)
        if P in (2, 4):  # x 1/P and x P are exact: then bit for bit
            assert torch.equal(out * P + owner_res, total)
        assert nnz <= P * -(-300 // P) and nnz < int(torch.count_nonzero(total))
        out8, owner_res8, sent8 = r["int8"]
        torch.testing.assert_close(out8 * P + owner_res8, sent8, rtol=0, atol=1e-5)
        out2, owner_res2, nnz2 = r["share2"]
        torch.testing.assert_close(out2 * P + owner_res2, total, rtol=0, atol=1e-6)
        assert nnz < nnz2 <= P * -(-600 // P)  # twice the share: more entries applied this exchange
        assert f"rank {P - 1}" in r["corrupt"] or "refused a phase-1 piece" in r["corrupt"], r["corrupt"]
        assert r["corrupt_state"] == (True, 0)  # worker residual untouched, owner accumulator restored
        assert r["sizes"] != "no error"
    for r in res[1:]:
        assert torch.equal(r["resparsified"][0], res[0]["resparsified"][0])  # every replica applies the same bits


def _aspg_replicas(rank, ws, steps):
    import torch.nn as nn

    from sparsecomm.optim import ASPG

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    opt = ASPG(model.parameters(), lr=1e-3, density=0.02, weight_decay=0.01, rebalance_every=2,
               paths=("split",), transport=TorchDistTransport())
    g = torch.Generator().manual_seed(rank)
    bounds = []
    for step in range(steps):
        x, y = torch.randn(8, 32, generator=g), torch.randn(8, 4, generator=g)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        if rank == 0 and step % 3 == 0:
            model[4].bias.grad = None  # a parameter without a gradient on one rank: it must still decay alike
        opt.step()
        bounds.append(list(opt.exchange.keys["flat"]["split"].bounds))
    return [p.detach().clone() for p in model.parameters()], bounds, opt.last_metrics


def test_aspg_on_the_split_path_keeps_replicas_identical_with_rebalancing(tmp_path):
    res = run_workers(_aspg_replicas, 3, tmp_path, 12)
    for params, bounds, m in res[1:]:
        for a, b in zip(res[0][0], params):
            assert torch.equal(a, b)
        assert bounds == res[0][1]
    bounds = res[0][1]
    assert bounds[0] != bounds[-1]  # the shard bounds moved to equal-count edges
    m = res[0][2]
    assert m["comm/path"] == "split" and {"timing/exchange_s", "timing/transfer_s"} <= set(m)
    k = m["comm/k"]
    # bytes per worker <= 2.5 x k x (raw index + bf16 value) + framing, whatever P
    assert m["comm/sent_bytes"] <= 2.5 * k * 6 + 3 * 2 * 400
