"""Selectors against torch.topk, counts, determinism and model-level budgets."""
import pytest
import torch

from sparsecomm.compress import SELECTORS, ChunkedTopK, RandomK, SampledThreshold, TopK, k_for, make_selector


@pytest.mark.parametrize("name", sorted(SELECTORS))
@pytest.mark.parametrize("numel,k", [(1, 0), (1, 1), (50, 50), (1000, 10), (300_000, 3000)])
def test_every_selector_returns_canonical_delta(name, numel, k):
    x = torch.randn(numel)
    d = make_selector(name).select(x.view(-1, 1) if numel > 1 else x, k).validate()
    assert torch.equal(d.values, x[d.indices])
    assert d.k >= k if name == "sampled" else d.k == k if name != "chunked" else abs(d.k - k) <= k // 10 + 1


def test_topk_keeps_the_largest_magnitudes():
    x = torch.randn(10_000)
    d = TopK().select(x, 100)
    kept = x.abs()[d.indices]
    dropped = torch.ones(10_000, dtype=torch.bool)
    dropped[d.indices] = False
    assert float(kept.min()) >= float(x.abs()[dropped].max())


@pytest.mark.parametrize("density", [0.1, 0.01, 0.001])
def test_sampled_threshold_matches_exact_topk(density):
    x = torch.randn(2_000_000)
    k = k_for(x.numel(), density)
    exact = TopK().select(x, k)
    sel = SampledThreshold(tolerance=0.05, seed=1)
    d = sel.select(x, k)
    assert k <= d.k <= k * 1.05
    # the candidate set covers the exact top-k, so every exact entry is in the selection
    assert bool(torch.isin(exact.indices, d.indices).all())
    assert float(d.values.abs().sum()) >= float(exact.values.abs().sum())


def test_sampled_threshold_with_zero_tolerance_is_exact():
    x = torch.randn(500_000)
    assert torch.equal(SampledThreshold(tolerance=0.0).select(x, 777).indices, TopK().select(x, 777).indices)


def test_sampled_threshold_recovers_from_an_undershooting_sample():
    # heavy ties: most entries equal, so a sampled threshold can land on the tie value
    x = torch.zeros(400_000)
    x[::1000] = 5.0
    d = SampledThreshold(seed=3).select(x, 1000)
    assert d.k >= 1000 and float(d.values.abs().sum()) == 5.0 * 400


def test_selection_by_score_takes_values_from_x():
    x = torch.arange(10.0)
    score = -x  # prefer the small ones
    d = TopK().select(x, 3, score=score)
    assert d.indices.tolist() == [0, 1, 2] and d.values.tolist() == [0.0, 1.0, 2.0]


def test_chunked_budget_is_spread_over_chunks():
    x = torch.randn(64 * 1024)
    x[:1024] *= 100  # all the mass in the first chunk: chunked still takes from every chunk
    d = ChunkedTopK(chunk_numel=1024).select(x, 640)
    per_chunk = torch.bincount(d.indices // 1024, minlength=64)
    assert bool((per_chunk == 10).all())


def test_randomk_is_uniform_and_seeded():
    x = torch.randn(100_000)
    a, b = RandomK(seed=5).select(x, 1000), RandomK(seed=5).select(x, 1000)
    assert torch.equal(a.indices, b.indices)
    counts = torch.bincount(a.indices // 10_000, minlength=10).float()
    assert float(counts.min()) > 60 and float(counts.max()) < 140


def test_k_for():
    assert k_for(1000, 0.01) == 10 and k_for(10, 0.001) == 1 and k_for(10, 0.0) == 0 and k_for(0, 0.5) == 0
    with pytest.raises(ValueError):
        k_for(10, 1.5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="outside"):
        TopK().select(torch.randn(5), 6)
    with pytest.raises(ValueError, match="score shape"):
        TopK().select(torch.randn(5), 2, score=torch.randn(4))
    with pytest.raises(ValueError, match="unknown selector"):
        make_selector("magic")
    with pytest.raises(ValueError):
        SampledThreshold(sample_fraction=0)


