"""The sparse DDP comm hook: parity with DDP's all-reduce at density 1, several buckets, pickling."""
import pickle

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sparsecomm.exchange import SparseHookState, sparse_topk_hook
from tests.distributed.helpers import run_workers

pytestmark = pytest.mark.distributed


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8))


def grads_after_backward(ddp, rank, step):
    g = torch.Generator().manual_seed(100 * rank + step)
    x, y = torch.randn(16, 64, generator=g), torch.randn(16, 8, generator=g)
    ddp.zero_grad()
    nn.functional.mse_loss(ddp(x), y).backward()
    return [p.grad.detach().clone() for p in ddp.parameters()]


def _parity(rank, ws):
    # bucket_cap_mb=0.1 (~26k floats) splits this ~85k-parameter model into several buckets
    plain = DDP(make_model(), bucket_cap_mb=0.1)
    hooked = DDP(make_model(), bucket_cap_mb=0.1)
    state = SparseHookState(density=1.0)
    hooked.register_comm_hook(state, sparse_topk_hook)
    out = []
    for step in range(3):
        out.append((grads_after_backward(plain, rank, step), grads_after_backward(hooked, rank, step)))
    return out, state.last_metrics


def test_density_one_equals_default_allreduce(tmp_path):
    for steps, metrics in run_workers(_parity, 2, tmp_path):
        for plain, hooked in steps:
            for a, b in zip(plain, hooked):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        assert metrics["comm/path"] == "dense"


def _sparse_buckets(rank, ws):
    model = DDP(make_model(), bucket_cap_mb=0.1)
    state = SparseHookState(density=0.1, value_codec="bf16")
    model.register_comm_hook(state, sparse_topk_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(5):
        grads = grads_after_backward(model, rank, step)
        opt.step()
    restored = pickle.loads(pickle.dumps(state))
    return ([p.detach().clone() for p in model.parameters()], grads, len(state.ef.residuals), state.iteration,
            state.last_metrics, restored.iteration, restored.process_group, sorted(restored.ef.residuals))


def test_sparse_hook_with_several_buckets_keeps_replicas_identical(tmp_path):
    res = run_workers(_sparse_buckets, 2, tmp_path)
    for r in res:
        params, grads, n_buckets, iteration, metrics, r_iter, r_group, r_keys = r
        assert n_buckets >= 2 and iteration == 5 and r_iter == 5 and r_group is None and len(r_keys) == n_buckets
        assert metrics["comm/path"] == "sparse" and metrics["comm/sent_bytes"] < metrics["comm/dense_equiv_bytes"]
        density = sum(int(torch.count_nonzero(g)) for g in grads) / sum(g.numel() for g in grads)
        # the union of two workers' selections; the sampled selector sends up to k x (1 + 5%)
        assert 0.1 <= density <= 2 * 0.1 * 1.05 + 0.005
    for a, b in zip(res[0][0], res[1][0]):
        assert torch.equal(a, b)


def test_bad_hyperparameters():
    for kw in ({"density": 0}, {"value_codec": "fp4"}, {"selector": "best"}, {"warmup_iterations": -1}):
        with pytest.raises(ValueError):
            SparseHookState(**kw)
