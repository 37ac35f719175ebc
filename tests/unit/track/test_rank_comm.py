import pytest
import torch
import torch.distributed as dist

from sparsecomm.track import CommTracker, RankTracker, entropy_rank, random_baseline, ring_allreduce_bytes, stable_rank, stacked_rank
from tests.unit.track.test_sparsity import TinyGPT


def test_rank_measures_on_known_matrices():
    u, v = torch.randn(50, 1), torch.randn(1, 40)
    assert stable_rank(u @ v) == pytest.approx(1.0, rel=1e-4)
    assert entropy_rank(torch.eye(30)) == pytest.approx(30.0, rel=1e-4)
    assert entropy_rank(u @ v) == pytest.approx(1.0, abs=1e-2)
    sr, er = random_baseline((64, 64))
    assert 2 < sr < 64 / 2 and 30 < er < 64  # "full rank" by these measures is well below min(m, n)


def test_stacked_rank_is_bounded_by_k():
    grads = [torch.randn(10_000) for _ in range(4)]  # independent: as high-rank as it gets
    out = stacked_rank(grads)
    assert out["rank/stacked_bound_k"] == 4 and out["rank/stacked/energy99"] <= 4 and out["rank/stacked/entropy"] <= 4


def test_rank_tracker_gradients_and_updates():
    model = TinyGPT()
    rt = RankTracker(model, every=2, update_window=2)
    x = torch.randint(0, 10, (8,))
    model.h[0].attn.c_attn(model.wte(x)).sum().backward()
    assert rt.observe_gradients(step=1) == {}
    m = rt.observe_gradients(step=2, tokens=8)
    name = "h.0.attn.c_attn.weight"
    assert m[f"rank/grad/bound_min_mn/{name}"] == 10 and m[f"rank/grad/bound_tokens/{name}"] == 8
    assert m[f"rank/grad/stable/{name}"] >= 1.0
    assert rt.observe_update() == {}
    with torch.no_grad():
        model.h[0].attn.c_attn.weight.add_(torch.outer(torch.ones(10), torch.arange(10.0)))
    m = rt.observe_update()
    assert m[f"rank/update/stable/{name}"] == pytest.approx(1.0, rel=1e-4)


def test_ring_formula():
    assert ring_allreduce_bytes(1000, 4, 1) == 0
    assert ring_allreduce_bytes(1000, 4, 2) == 4000
    assert ring_allreduce_bytes(1000, 4, 4) == 6000


def test_comm_tracker_phases_bytes_and_reset():
    c = CommTracker()
    with c.phase("select"):
        pass
    with c.phase("select"):
        pass
    c.add_sent(100)
    c.add_sent(20)
    c.add_received(7)
    c.note(path="sparse", k=5)
    m = c.collect(numel=1000, world_size=4)
    assert m["comm/sent_bytes"] == 120 and m["comm/recv_bytes"] == 7 and m["comm/dense_equiv_bytes"] == 6000
    assert m["comm/path"] == "sparse" and m["timing/select_s"] >= 0
    assert c.collect(numel=1000, world_size=4)["comm/sent_bytes"] == 0


def test_dense_baseline_is_a_real_allreduce(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        c = CommTracker(dense_baseline_every=2)
        ts = [torch.ones(100), torch.ones(3, 3)]
        assert c.dense_baseline(1, ts) is None
        assert c.dense_baseline(2, ts) > 0
        assert "timing/dense_allreduce_s" in c.collect(numel=109)
        assert torch.equal(ts[0], torch.ones(100))  # the model's tensors are never touched
    finally:
        dist.destroy_process_group()
