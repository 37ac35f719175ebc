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




@pytest.mark.parametrize("name", ["sampled", "reuse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_move_in_equals_adding_first(name, dtype):
    """select(e, k, move_in=g) == select(e + g, k) with the same generator state, e holds e + g
    afterwards (bit for bit) and g is zeroed: the error-feedback addition fused into the pass."""
    gen = torch.Generator().manual_seed(4)
    e0 = torch.randn(300_000, generator=gen)
    fused, plain = make_selector(name, seed=9), make_selector(name, seed=9)
    e_f, e_p = e0.clone(), e0.clone()
    for step in range(4):  # the reuse selector's second call onwards takes its reuse path
        g = torch.randn(300_000, generator=gen).to(dtype)
        g_f = g.clone()
        d_f = fused.select(e_f, 3000, move_in=g_f)
        e_p += g
        d_p = plain.select(e_p, 3000)
        assert torch.equal(e_f, e_p) and not g_f.any(), step
        assert torch.equal(d_f.indices, d_p.indices) and torch.equal(d_f.values, d_p.values), step
        e_f[d_f.indices] = 0
        e_p[d_p.indices] = 0


def test_move_in_is_refused_with_a_score():
    x = torch.randn(10_000)
    with pytest.raises(ValueError, match="move_in"):
        SampledThreshold().select(x, 10, score=x.abs(), move_in=torch.zeros(10_000))


def test_trim_keeps_exactly_k_with_ties_in_position_order():
    from sparsecomm.compress.select import _keep_top

    cand = torch.arange(10) * 7
    ranked = torch.tensor([1.0, 5.0, 3.0, 3.0, 9.0, 3.0, 0.5, 3.0, 2.0, 8.0])
    kept, vals, thr = _keep_top(cand, -ranked, 5, use_abs=True)  # 9, 8, 5 and the first two of the four 3s
    assert kept.tolist() == [7, 14, 21, 28, 63] and vals.tolist() == [-5.0, -3.0, -3.0, -9.0, -8.0] and thr == 3.0
