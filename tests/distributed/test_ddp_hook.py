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
    # ~560k parameters (2.2 MB): DDP's initial buckets (1 MB first, then bucket_cap_mb) are several, and its
    # rebuilt ones after the first iteration are laid out differently: the hook's virtual buckets are exercised
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 8))


def grads_after_backward(ddp, rank, step):
    g = torch.Generator().manual_seed(100 * rank + step)
    x, y = torch.randn(16, 64, generator=g), torch.randn(16, 8, generator=g)
    ddp.zero_grad()
    nn.functional.mse_loss(ddp(x), y).backward()
    return [p.grad.detach().clone() for p in ddp.parameters()]


def _parity(rank, ws):
    # bucket_cap_mb=0.5 (~26k floats) splits this ~85k-parameter model into several buckets
    plain = DDP(make_model(), bucket_cap_mb=0.5)
    hooked = DDP(make_model(), bucket_cap_mb=0.5)
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


def _sparse_buckets(rank, ws, steps=5, switch="volume"):
    model = DDP(make_model(), bucket_cap_mb=0.5)
    state = SparseHookState(density=0.1, value_codec="bf16", switch=switch)
    model.register_comm_hook(state, sparse_topk_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        grads = grads_after_backward(model, rank, step)
        opt.step()
    restored = pickle.loads(pickle.dumps(state))
    return ([p.detach().clone() for p in model.parameters()], grads, len(state.ef.residuals), state.iteration,
            state.last_metrics, restored.iteration, restored.process_group, sorted(restored.ef.residuals),
            max(len(st["chooser"].time_s) for st in state.exchange.keys.values()))


def test_sparse_hook_with_several_buckets_keeps_replicas_identical(tmp_path):
    res = run_workers(_sparse_buckets, 2, tmp_path)
    for r in res:
        params, grads, n_buckets, iteration, metrics, r_iter, r_group, r_keys, _ = r
        assert n_buckets >= 2 and iteration == 5 and r_iter == 5 and r_group is None and len(r_keys) == n_buckets
        assert metrics["comm/path"] == "allgather" and metrics["comm/sent_bytes"] < metrics["comm/dense_equiv_bytes"]
        density = sum(int(torch.count_nonzero(g)) for g in grads) / sum(g.numel() for g in grads)
        # the union of two workers' selections; the sampled selector sends up to k x (1 + 5%)
        assert 0.1 <= density <= 2 * 0.1 * 1.05 + 0.005
    for a, b in zip(res[0][0], res[1][0]):
        assert torch.equal(a, b)


def test_measured_switch_with_several_buckets_keeps_replicas_identical(tmp_path):
    """switch="measured": per bucket every candidate (paths x raw / Rice indices) is timed once, then the fastest
    taken; every rank decides alike (max-over-ranks timings), so the replicas stay bit-identical."""
    res = run_workers(_sparse_buckets, 2, tmp_path, 10, "measured")
    assert all(r[3] == 10 and r[8] >= 3 for r in res)  # the buckets' choosers timed several candidates
    for a, b in zip(res[0][0], res[1][0]):
        assert torch.equal(a, b)


def test_bad_hyperparameters():
    for kw in ({"density": 0}, {"value_codec": "fp4"}, {"selector": "best"}, {"warmup_iterations": -1}):
        with pytest.raises(ValueError):
            SparseHookState(**kw)


def _split_overlap_resume(rank, ws, tmpdir):
    """P=3, several buckets, split path, background thread; then pickle the state mid-run (a checkpoint)
    and continue once in place and once from fresh objects: the same weights bit for bit."""
    def run(model, state, steps, start):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(start, start + steps):
            grads_after_backward(model, rank, step)
            opt.step()

    model = DDP(make_model(), bucket_cap_mb=0.5)
    state = SparseHookState(density=0.05, seed=rank, paths=("split",))  # at P=3 the volume rule picks the all-gather
    model.register_comm_hook(state, sparse_topk_hook)
    run(model, state, 4, 0)
    ckpt = pickle.dumps({"model": model.module.state_dict(), "hook": state})
    run(model, state, 3, 4)
    first = [p.detach().clone() for p in model.parameters()]
    paths = state.last_metrics["comm/path"]
    ck = pickle.loads(ckpt)
    fresh = make_model()
    fresh.load_state_dict(ck["model"])
    model2 = DDP(fresh, bucket_cap_mb=0.5)
    model2.register_comm_hook(ck["hook"], sparse_topk_hook)
    run(model2, ck["hook"], 3, 4)
    state.close()
    ck["hook"].close()
    return first, [p.detach().clone() for p in model2.parameters()], paths, len(state.ef.residuals)


def test_split_path_with_overlap_keeps_replicas_identical_and_resumes_exactly(tmp_path):
    res = run_workers(_split_overlap_resume, 3, tmp_path, str(tmp_path))
    for first, resumed, path, n_buckets in res:
        assert path == "split" and n_buckets >= 2
        for a, b in zip(first, resumed):
            assert torch.equal(a, b)
    for a, b in zip(res[0][0], res[2][0]):
        assert torch.equal(a, b)


def _bf16(rank, ws):
    """A bf16 model under DDP (bf16 gradient buckets): density 1 against DDP's own bf16 all-reduce, and 10% on
    the split path for 4 SGD steps."""
    def grads_bf16(ddp, step):
        g = torch.Generator().manual_seed(100 * rank + step)
        x, y = torch.randn(16, 64, generator=g).bfloat16(), torch.randn(16, 8, generator=g).bfloat16()
        ddp.zero_grad()
        nn.functional.mse_loss(ddp(x).float(), y.float()).backward()
        return [p.grad.detach().clone() for p in ddp.parameters()]

    plain, full = DDP(make_model().bfloat16(), bucket_cap_mb=0.5), DDP(make_model().bfloat16(), bucket_cap_mb=0.5)
    full.register_comm_hook(SparseHookState(density=1.0), sparse_topk_hook)
    parity = [(grads_bf16(plain, s), grads_bf16(full, s)) for s in range(2)]
    model = DDP(make_model().bfloat16(), bucket_cap_mb=0.5)
    state = SparseHookState(density=0.1, paths=("split",))
    model.register_comm_hook(state, sparse_topk_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        grads = grads_bf16(model, step)
        opt.step()
    return {"parity": parity, "params": [p.detach().clone() for p in model.parameters()],
            "grad_dtypes": {str(g.dtype) for g in grads}, "path": state.last_metrics["comm/path"],
            "residual_dtypes": {str(r.dtype) for r in state.ef.residuals.values()},
            "residual_nonzero": sum(int(r.count_nonzero()) for r in state.ef.residuals.values())}


def test_bf16_buckets(tmp_path):
    """bf16 gradients: at density 1 the hook matches DDP's bf16 all-reduce to bf16 rounding (the hook sums in
    fp32), at 10% on the split path the replicas stay bit-identical, the buckets stay bf16 and the residuals
    that hold what was not sent are fp32 (bf16 residuals would round small gradients away)."""
    res = run_workers(_bf16, 2, tmp_path)
    for r in res:
        for plain, hooked in r["parity"]:
            for a, b in zip(plain, hooked):
                torch.testing.assert_close(b.float(), a.float(), rtol=2 ** -7, atol=1e-6)
        assert r["path"] == "split" and r["grad_dtypes"] == {"torch.bfloat16"}
        assert r["residual_dtypes"] == {"torch.float32"} and r["residual_nonzero"] > 0
    for a, b in zip(res[0]["params"], res[1]["params"]):
        assert torch.equal(a, b)
