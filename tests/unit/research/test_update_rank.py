"""Whole-run update rank (sparsecomm/research/update_rank.py): a known low-rank update comes out at
its rank, well below the same-shape random baseline; the token bound and both changed fractions
are recorded."""
import torch
import torch.nn as nn

from sparsecomm.research.update_rank import PREFIX, WholeRunRank, whole_run_rank


def _orthonormal(m, k, seed):
    q, _ = torch.linalg.qr(torch.randn(m, k, generator=torch.Generator().manual_seed(seed)))
    return q


def test_known_low_rank_update_comes_out_right():
    m, n, k = 64, 48, 3
    w0 = torch.randn(m, n, generator=torch.Generator().manual_seed(0))
    u, v = _orthonormal(m, k, 1), _orthonormal(n, k, 2)
    delta = u @ torch.diag(torch.full((k,), 0.5)) @ v.T  # rank 3, equal singular values
    out = whole_run_rank({"w": w0}, {"w": w0 + delta}, tokens=2)
    # equal singular values: stable rank, entropy rank and numerical rank are all exactly k
    assert abs(out[f"{PREFIX}/stable/w"] - k) < 1e-3
    assert abs(out[f"{PREFIX}/entropy/w"] - k) < 1e-2
    assert out[f"{PREFIX}/numerical/w"] == k
    assert out[f"{PREFIX}/bound_min_mn/w"] == n and out[f"{PREFIX}/bound_tokens/w"] == 2 and out[f"{PREFIX}/tokens"] == 2
    # the baseline: a Gaussian matrix of the same shape and Frobenius norm is far higher-rank
    assert abs(out[f"{PREFIX}/random_fro/w"] - out[f"{PREFIX}/fro/w"]) < 1e-4
    assert out[f"{PREFIX}/random_stable/w"] > 4 * k and out[f"{PREFIX}/random_entropy/w"] > 10 * k
    assert abs(out[f"{PREFIX}/mean_stable_over_min_mn"] - k / n) < 1e-4
    # unequal singular values (4, 2, 1): stable rank = sum s^2 / max s^2
    s = torch.tensor([4.0, 2.0, 1.0])
    out = whole_run_rank({"w": w0}, {"w": w0 + u @ torch.diag(s) @ v.T})
    assert abs(out[f"{PREFIX}/stable/w"] - float((s ** 2).sum() / 16)) < 1e-3
    assert out[f"{PREFIX}/numerical/w"] == 3 and f"{PREFIX}/bound_tokens/w" not in out


def test_changed_fractions_fp32_and_bf16_view():
    w0 = torch.full((8, 4), 1.0)
    w1 = w0.clone()
    w1[0, :] += 1e-4   # below half a bf16 ULP of 1.0 (2^-8): changes fp32, not the bf16 view
    w1[1, :] += 0.5    # visible in both
    out = whole_run_rank({"w": w0}, {"w": w1})
    assert out[f"{PREFIX}/changed/fp32_exact/global"] == 8 / 32
    assert out[f"{PREFIX}/changed/bf16_view/global"] == 4 / 32
    zero = whole_run_rank({"w": w0}, {"w": w0.clone()})
    assert zero[f"{PREFIX}/stable/w"] == 0.0 and zero[f"{PREFIX}/numerical/w"] == 0


def test_tracker_measures_the_update_since_construction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12, bias=True), nn.Linear(12, 10))
    tracker = WholeRunRank(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):  # three SGD steps on batches of 1 token: the update of each matrix has rank <= 3
        x = torch.randn(1, 16)
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        tracker.observe_tokens(1)
    out = tracker.finish()
    assert out[f"{PREFIX}/tokens"] == 3 and f"{PREFIX}/stable/0.bias" not in out  # 2-D matrices only
    for name in ("0.weight", "1.weight"):
        assert out[f"{PREFIX}/bound_tokens/{name}"] == 3
        assert out[f"{PREFIX}/numerical/{name}"] <= 3  # plain SGD respects the token bound
        assert out[f"{PREFIX}/stable/{name}"] <= out[f"{PREFIX}/numerical/{name}"] + 1e-6
