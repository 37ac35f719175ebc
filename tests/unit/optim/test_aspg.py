"""ASPG single process: AdamW at density 1, error feedback conservation, options, exact resume."""
import copy

import pytest
import torch
import torch.nn as nn

from sparsecomm.compress import TopK
from sparsecomm.exchange import choose_path
from sparsecomm.optim import ASPG


def model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 16, generator=g), torch.randn(4, 8, generator=g)) for _ in range(n)]


def train(m, opt, data):
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        opt.step()


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_density_one_matches_adamw(wd):
    a, b = model(), model()
    ref = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=wd)
    opt = ASPG(b.parameters(), lr=1e-2, weight_decay=wd, density=1.0)
    data = batches(20)
    train(a, ref, data)
    train(b, opt, data)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-6, atol=1e-7)
    assert opt.last_metrics["comm/path"] == "dense"


def fixed_grad_run(density, steps=15, **kw):
    """Gradients that do not depend on the weights: Adam's updates are the same whatever is applied."""
    p = nn.Parameter(torch.zeros(1000))
    opt = ASPG([p], lr=1e-2, density=density, value_codec="fp32", **kw)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        p.grad = torch.randn(1000, generator=g)
        opt.step()
    return p.detach(), opt


def test_nothing_is_lost_weights_plus_residual_equal_dense():
    dense, _ = fixed_grad_run(1.0)
    sparse, opt = fixed_grad_run(0.05)
    assert opt.last_metrics["comm/path"] == "allgather" and opt.last_metrics["comm/k"] == 50
    changed = int(torch.count_nonzero(sparse))
    assert changed < 1000  # the update really was sparse
    torch.testing.assert_close(sparse + opt.ef.residuals["flat"], dense, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("value_codec", ["bf16", "int8"])
def test_lossy_values_are_compensated(value_codec):
    dense, _ = fixed_grad_run(1.0)
    p = nn.Parameter(torch.zeros(1000))
    opt = ASPG([p], lr=1e-2, density=0.05, value_codec=value_codec)
    g = torch.Generator().manual_seed(0)
    for _ in range(15):
        p.grad = torch.randn(1000, generator=g)
        opt.step()
    torch.testing.assert_close(p.detach() + opt.ef.residuals["flat"], dense, rtol=1e-5, atol=1e-6)


def test_global_and_per_tensor_budgets():
    m = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 1))
    for budget in ("global", "per_tensor"):
        opt = ASPG(m.parameters(), density=0.1, budget=budget, selector="topk")
        m(torch.randn(3, 100)).sum().backward()
        opt.step()
        total = sum(p.numel() for p in m.parameters())
        if budget == "per_tensor":
            assert opt.last_metrics["comm/k"] == sum(round(0.1 * p.numel()) or 1 for p in m.parameters())
        else:
            assert opt.last_metrics["comm/k"] == round(0.1 * total)


def test_warmup_is_dense_then_sparse():
    _, opt = fixed_grad_run(0.01, steps=3, warmup_steps=2)
    assert opt.last_metrics["comm/path"] == "allgather"
    _, opt = fixed_grad_run(0.01, steps=2, warmup_steps=2)
    assert opt.last_metrics["comm/path"] == "dense"


def test_local_steps_exchange_every_h():
    p = nn.Parameter(torch.zeros(100))
    opt = ASPG([p], lr=1e-2, density=0.1, local_steps=3)
    seen = []
    for _ in range(6):
        p.grad = torch.ones(100)
        opt.step()
        seen.append("comm/path" in opt.last_metrics)
    assert seen == [False, False, True, False, False, True] and opt.version == 2


def test_adaptive_density_captures_the_mass():
    p = nn.Parameter(torch.zeros(10_000))
    opt = ASPG([p], density=0.5, adaptive_epsilon=0.1, min_density=0.001, max_density=0.5)
    grad = torch.zeros(10_000)
    grad[:100] = 1.0  # Adam's first update is ~lr * sign(g): all mass on 100 entries
    p.grad = grad
    opt.step()
    assert 0.001 <= opt.last_metrics["comm/density"] <= 0.02


@pytest.mark.parametrize("importance", ["magnitude", "ema_grad", "random"])
def test_other_importance_rules_run(importance):
    m = model()
    opt = ASPG(m.parameters(), lr=1e-2, density=0.1, importance=importance)
    train(m, opt, batches(3))
    assert opt.last_metrics["comm/path"] == "allgather"


def test_impact_ranks_by_residual_times_gradient_ema():
    """The default importance sends the entries whose residual moves the loss most (|e * s|), not the
    largest residuals: a small residual on a steep coordinate beats a large one on a flat coordinate."""
    w = nn.Parameter(torch.zeros(6))
    opt = ASPG([w], lr=1e-2, density=2 / 6, selector="topk")
    opt.ef.residuals["flat"].copy_(torch.tensor([1.0, 0.1, -0.5, 0.2, -0.05, 0.0]))
    opt._score.copy_(torch.tensor([0.01, 5.0, -0.1, 0.0, -3.0, 9.0]))  # signed EMA of the gradient
    # |e * s| = [0.01, 0.5, 0.05, 0, 0.15, 0]: entries 1 and 4; by |e| alone it would be 0 and 2
    assert opt._select(TopK(), 2, [2 / 6]).indices.tolist() == [1, 4]
    by_magnitude = ASPG([w], lr=1e-2, density=2 / 6, selector="topk", importance="magnitude")
    by_magnitude.ef.residuals["flat"].copy_(opt.ef.residuals["flat"])
    assert by_magnitude._select(TopK(), 2, [2 / 6]).indices.tolist() == [0, 2]


def test_impact_keeps_an_fp32_ema_of_bf16_gradients():
    m = model().to(torch.bfloat16)
    opt = ASPG(m.parameters(), lr=1e-2, density=0.1)
    for x, y in batches(3):
        opt.zero_grad()
        nn.functional.mse_loss(m(x.bfloat16()), y.bfloat16()).backward()
        opt.step()
    assert opt._score.dtype == torch.float32 and opt._score.abs().sum() > 0
    assert opt.last_metrics["comm/path"] == "allgather"


def test_exact_resume():
    data = batches(10)
    m1 = model()
    o1 = ASPG(m1.parameters(), lr=1e-2, density=0.05, importance="ema_grad", adaptive_epsilon=0.2)
    train(m1, o1, data[:5])
    ckpt = copy.deepcopy({"model": m1.state_dict(), "opt": o1.state_dict()})
    train(m1, o1, data[5:])

    m2 = model(seed=123)
    o2 = ASPG(m2.parameters(), lr=1e-2, density=0.05, importance="ema_grad", adaptive_epsilon=0.2)
    m2.load_state_dict(ckpt["model"])
    o2.load_state_dict(ckpt["opt"])
    train(m2, o2, data[5:])
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(o1.ef.residuals["flat"], o2.ef.residuals["flat"])
    assert o1.version == o2.version == 10


def test_resume_with_other_options_is_refused():
    m = model()
    o = ASPG(m.parameters(), density=0.05)
    with pytest.raises(ValueError, match="options"):
        ASPG(m.parameters(), density=0.1).load_state_dict(o.state_dict())


def test_bad_config():
    ps = list(model().parameters())
    for kw in ({"density": 0}, {"density": 1.5}, {"budget": "layer"}, {"importance": "vibes"}, {"local_steps": 0},
               {"value_codec": "fp8"}, {"adaptive_epsilon": 2.0}, {"lr": -1}):
        with pytest.raises(ValueError):
            ASPG(ps, **kw)


def test_switch_rule():
    n = 124_439_808
    k = lambda d: round(d * n)  # noqa: E731
    assert choose_path(n, k(0.01), 8, 2) == "split"  # ~2.6k entries per worker vs the all-gather's 7k
    assert choose_path(n, k(0.01), 2, 2) == "allgather"  # P=2: fewer bytes (k vs 1.5k), one collective fewer
    # P=3: the owners' 2k/P share makes the split's bytes equal the all-gather's, plus framing: all-gather;
    # with the k/P share the split wins from P=3
    assert choose_path(n, k(0.01), 3, 2) == "allgather" and choose_path(n, k(0.01), 4, 2) == "split"
    assert choose_path(n, k(0.01), 3, 2, owner_share=1.0) == "split"
    assert choose_path(n, k(0.01), 8, 2, candidates=("dense", "allgather")) == "allgather"
    # all-gather, bf16 values + ~3 index bits: 7 x 0.3 x 2.4 B = 5.0 B/param < ring 2 x 7/8 x 4 B = 7 B/param
    assert choose_path(n, k(0.3), 8, 2, candidates=("dense", "allgather")) == "allgather"
    assert choose_path(n, k(0.5), 8, 2, candidates=("dense", "allgather")) == "dense"  # 7 x 0.5 x 2.25 = 7.9 B
    # split: 3 x 7/8 x density x b < 2 x 7/8 x 4 B while b < 8/3 / density: with bf16 values always (by bytes;
    # the measured switch is what catches its CPU cost at high density)
    assert choose_path(n, k(0.5), 8, 2) == "split" and choose_path(n, k(0.95), 8, 2) == "split"
    assert choose_path(n, n, 8, 2) == "dense" and choose_path(n, n, 8, 2, candidates=("allgather", "split")) == "split"
    assert choose_path(n, n, 1, 2) == "dense" and choose_path(n, k(0.5), 1, 2) == "allgather"


def test_measured_switch_probes_every_candidate_then_takes_the_fastest():
    from sparsecomm.exchange import PathChooser

    n, k = 10_000_000, 100_000
    c = PathChooser("measured", probe_every=4, ema=1.0)
    probes = []
    for s in (0.10, 0.30, 0.20):
        probes.append(c.choose(n, k, 4, 2))
        c.observe(probes[-1], s)
    assert probes == ["dense", "allgather", "split"]
    picks = [c.choose(n, k, 4, 2) for _ in range(8)]
    assert picks.count("dense") == 6 and sorted(set(picks) - {"dense"}) == ["allgather", "split"]  # re-probes in turn
    c.observe("split", 0.05)  # the link got slower, say: split is now the fastest
    assert [c.choose(n, k, 4, 2) for _ in range(3)] == ["allgather", "split", "split"]  # (decision 12 re-probes)
    assert PathChooser("measured").choose(n, n, 8, 4) == "dense"  # density 1: dense, untimed
    with pytest.raises(ValueError):
        PathChooser("fastest")
    with pytest.raises(ValueError):
        PathChooser(candidates=("dense", "gossip"))


def test_measured_switch_keeps_the_fewest_bytes_unless_another_is_clearly_faster():
    """Candidates "path:codec": the volume rule's own (split with entropy-coded indices) stays when raw indices
    are faster by less than the 10% tolerance, and yields when they are faster by more."""
    from sparsecomm.exchange import PathChooser

    n, k = 10_000_000, 100_000
    for raw_s, expect in ((0.95, "split:auto"), (0.85, "split:raw")):
        c = PathChooser("measured", candidates=("dense", "split:raw", "split:auto"), probe_every=100, ema=1.0)
        for cand, s in (("dense", 5.0), ("split:raw", raw_s), ("split:auto", 1.0)):
            assert c.choose(n, k, 4, 2) == cand
            c.observe(cand, s)
        assert c.choose(n, k, 4, 2) == expect
    with pytest.raises(ValueError, match="tolerance >= 0"):
        PathChooser("measured", tolerance=-0.1)


def test_measured_switch_state_round_trips():
    p = nn.Parameter(torch.zeros(1000))
    o = ASPG([p], density=0.1, switch="measured")
    p.grad = torch.ones(1000)
    o.step()
    o2 = ASPG([nn.Parameter(torch.zeros(1000))], density=0.1, switch="measured")
    o2.load_state_dict(o.state_dict())
    assert o2.chooser.state_dict() == o.chooser.state_dict()


def test_param_group_density_sets_each_tensors_budget():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(1000)), torch.nn.Parameter(torch.randn(100))
    opt = ASPG([{"params": [a], "density": 0.01}, {"params": [b], "density": 1.0}], lr=0.1, density=0.5, budget="per_tensor")
    a0, b0 = a.detach().clone(), b.detach().clone()
    a.grad, b.grad = torch.randn(1000), torch.randn(100)
    opt.step()
    assert int((a != a0).sum()) == 10 and int((b != b0).sum()) == 100  # 1% of a, all of b
    assert opt.last_metrics["comm/k"] == 110
    with pytest.raises(ValueError, match="per_tensor"):
        ASPG([{"params": [a], "density": 0.01}], lr=0.1)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ASPG([{"params": [a], "density": 2.0}], lr=0.1, budget="per_tensor")


class Mixed(nn.Module):
    """A bf16 layer feeding an fp32 one (a bf16 body with an fp32 head, as mixed-precision recipes do)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body, self.head = nn.Linear(16, 32).to(torch.bfloat16), nn.Linear(32, 8)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x.to(torch.bfloat16))).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "mixed"])
def test_exact_resume_in_every_precision(dtype):
    """Train N, save, train M == train N, save, load into fresh objects, train M: bit for bit, bf16 and
    mixed bf16/fp32 parameters too (torch's Optimizer.load_state_dict casts per-parameter state to
    the parameter dtype: ASPG's fp32 residual, importance and master copies must not travel there)."""
    data = batches(8)
    make = (lambda seed=0: Mixed(seed)) if dtype == "mixed" else (lambda seed=0: model(seed).to(dtype))
    io_dtype = torch.float32 if dtype == "mixed" else dtype

    def run(m, o, part):
        for x, y in part:
            o.zero_grad()
            nn.functional.mse_loss(m(x.to(io_dtype)), y.to(io_dtype)).backward()
            o.step()

    m1 = make()
    o1 = ASPG(m1.parameters(), lr=1e-2, density=0.05, weight_decay=0.01)
    run(m1, o1, data[:4])
    ckpt = copy.deepcopy({"model": m1.state_dict(), "opt": o1.state_dict()})
    run(m1, o1, data[4:])
    m2 = make(seed=5)
    o2 = ASPG(m2.parameters(), lr=1e-2, density=0.05, weight_decay=0.01)
    m2.load_state_dict(ckpt["model"])
    o2.load_state_dict(ckpt["opt"])
    run(m2, o2, data[4:])
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(o1.ef.residuals["flat"], o2.ef.residuals["flat"])


def test_bf16_weights_lose_no_applied_delta():
    """Gradients independent of the weights: fp32 master (what was applied) + residual == the dense run's
    master, although most single updates (lr 1e-4) are below half a bf16 ulp of their weight (3.9e-3)."""
    def run(density, dtype):
        p = nn.Parameter(torch.ones(2000, dtype=dtype))
        opt = ASPG([p], lr=1e-4, density=density, value_codec="fp32")
        g = torch.Generator().manual_seed(0)
        for _ in range(30):
            p.grad = torch.randn(2000, generator=g).to(dtype)
            opt.step()
        return p, opt

    _, dense = run(1.0, torch.bfloat16)
    p, opt = run(0.05, torch.bfloat16)
    master = opt._masters[0]
    torch.testing.assert_close(master + opt.ef.residuals["flat"], dense._masters[0], rtol=0, atol=1e-6)
    assert torch.equal(p.detach(), master.bfloat16())  # the weights are the master, rounded once
    assert int((master != 1.0).sum()) > int((p.detach().float() != 1.0).sum())  # sub-ulp moves were kept, not lost


def test_weight_decay_reaches_parameters_without_a_gradient():
    """Decoupled decay comes from replicated state only: a parameter that got no gradient on this rank
    still decays (another rank may have had one), and every replica decays it the same way."""
    a, b = nn.Parameter(torch.ones(10)), nn.Parameter(torch.ones(10))
    opt = ASPG([a, b], lr=0.1, weight_decay=0.5, density=0.5)
    a.grad = torch.zeros(10)
    opt.step()
    torch.testing.assert_close(b.detach(), torch.full((10,), 0.95))  # 1 - lr x wd, no gradient needed
    assert b.grad is None and "exp_avg" not in opt.state[b]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_memory_counts_every_buffer(dtype):
    """memory/* metrics: the bytes of ASPG's moments (parameter dtype), fp32 residual, importance EMA and its
    ranking buffer, and fp32 masters for low-precision parameters; their sum is the state total."""
    m = model().to(dtype)
    n = sum(p.numel() for p in m.parameters())
    opt = ASPG(m.parameters(), lr=1e-2, density=0.1)
    x, y = batches(1)[0]
    nn.functional.mse_loss(m(x.to(dtype)).float(), y).backward()
    opt.step()
    mem = {k: v for k, v in opt.last_metrics.items() if k.startswith("memory/")}
    width = torch.finfo(dtype).bits // 8
    assert mem["memory/aspg_moments_bytes"] == 2 * n * width
    assert mem["memory/aspg_residual_bytes"] == 4 * n
    assert mem["memory/aspg_importance_bytes"] == 2 * 4 * n  # EMA + the |residual x EMA| ranking buffer
    assert mem["memory/aspg_master_bytes"] == (4 * n if dtype == torch.bfloat16 else 0)
    assert mem["memory/aspg_state_bytes"] == sum(v for k, v in mem.items() if k != "memory/aspg_state_bytes")
    assert "memory/cuda_peak_allocated_bytes" not in mem  # CPU


def test_stochastic_rounding_is_unbiased_where_round_to_nearest_loses_everything():
    """add_stochastic_: 1000 additions of 1e-3 to 1.0 in bf16 (half an ulp of 1.0 is 3.9e-3, so round-to-nearest
    stays at 1.0); stochastic rounding ends near 2.0, and its mean over 4096 entries is within 1% of it."""
    from sparsecomm.optim.aspg import add_stochastic_

    gen = torch.Generator().manual_seed(0)
    sr = torch.ones(4096, dtype=torch.bfloat16)
    rn = torch.ones(4096, dtype=torch.bfloat16)
    step = torch.full((4096,), 1e-3)
    for _ in range(1000):
        add_stochastic_(sr, step, gen)
        rn.add_(step.bfloat16())
    assert torch.equal(rn, torch.ones_like(rn))
    assert abs(float(sr.float().mean()) - 2.0) < 0.02
    neg = -torch.ones(4096, dtype=torch.bfloat16)  # negative values: the same, mirrored
    for _ in range(1000):
        add_stochastic_(neg, -step, gen)
    assert abs(float(neg.float().mean()) + 2.0) < 0.02
    # already-representable sums are exact; inf and nan (even an all-ones mantissa) stay so
    x = torch.tensor([1.0, -1.0, -3.0, float("inf"), 0.0], dtype=torch.bfloat16)
    nan = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)
    add_stochastic_(x, torch.cat([torch.tensor([0.5, -0.5, 1.0, 1.0]), nan]), gen)
    assert x[:4].tolist() == [1.5, -1.5, -2.0, float("inf")] and bool(x[4].isnan())


@pytest.mark.parametrize("importance", ["impact", "ema_grad", "magnitude"])
def test_bf16_state_halves_the_buffers(importance):
    """state_dtype=bf16: residual, importance EMA and its ranking buffer in bf16 (2 B per parameter each)."""
    m = model()
    n = sum(p.numel() for p in m.parameters())
    opt = ASPG(m.parameters(), lr=1e-2, density=0.1, importance=importance, state_dtype="bf16")
    train(m, opt, batches(2))
    assert opt.ef.residuals["flat"].dtype == torch.bfloat16
    mem = opt.last_metrics
    assert mem["memory/aspg_residual_bytes"] == 2 * n
    assert mem["memory/aspg_importance_bytes"] == {"impact": 2 * 2 * n, "ema_grad": 2 * n, "magnitude": 0}[importance]


def test_bf16_state_loses_nothing_on_average():
    """Gradients independent of the weights, a drift so every residual keeps growing, 0.2% sent per step: an
    entry waits ~500 steps, its residual reaches ~0.15 where half a bf16 step (4.9e-4) exceeds one update
    (~3e-4). applied + residual must match the fp32 dense sum without bias: round-to-nearest additions lose
    1.7e-3 per entry on average here (checked by hand), stochastic rounding's mean error is ~1e-4."""
    def run(state_dtype, density):
        p = nn.Parameter(torch.zeros(1000))
        opt = ASPG([p], lr=1e-3, density=density, value_codec="bf16", state_dtype=state_dtype)
        g = torch.Generator().manual_seed(0)
        for _ in range(600):
            p.grad = torch.randn(1000, generator=g) + 0.3
            opt.step()
        return p.detach(), opt

    dense, _ = run("fp32", 1.0)
    p, opt = run("bf16", 0.002)
    err = p + opt.ef.residuals["flat"].float() - dense
    assert float(err.abs().max()) < 0.03  # bf16 rounding of a ~0.15 residual, summed over its additions
    assert abs(float(err.mean())) < 6e-4


def test_bf16_state_per_tensor_budget_and_adaptive_density():
    """The per-tensor budget's delta carries the residual's dtype (bf16), and adaptive density samples in fp32."""
    m = model()
    opt = ASPG(m.parameters(), lr=1e-2, density=0.05, budget="per_tensor", state_dtype="bf16")
    train(m, opt, batches(3))
    assert opt.last_metrics["comm/k"] == sum(max(1, round(0.05 * p.numel())) for p in m.parameters())
    m = model()
    opt = ASPG(m.parameters(), lr=1e-2, adaptive_epsilon=0.1, state_dtype="bf16")
    train(m, opt, batches(3))
    assert 1e-4 <= opt.last_metrics["comm/density"] <= 0.25


def test_split_flush_into_a_bf16_residual_is_unbiased():
    """An owner residual handed back into a bf16 worker residual (path switch, rebalance): stochastically
    rounded, so 1e-3 added to 1.0 (below half an ulp: round-to-nearest would keep 1.0) arrives on average."""
    from sparsecomm.exchange.split import SplitAllReduce

    split = SplitAllReduce(8192, 2, 0)
    split.acc = torch.full((4096,), 1e-3)
    e = torch.ones(8192, dtype=torch.bfloat16)
    split.flush_(e)
    assert abs(float(e[:4096].float().mean()) - 1.001) < 3e-4 and torch.equal(e[4096:], torch.ones(4096, dtype=torch.bfloat16))
    assert not split.acc.any()
    state = split.state_dict()  # the rounding stream resumes with the rest
    again = SplitAllReduce(8192, 2, 0)
    again.load_state_dict(state)
    assert torch.equal(again.round_gen.get_state(), split.round_gen.get_state())


def test_bf16_state_resume_is_bit_exact_and_options_are_checked():
    data = batches(8)
    m1 = model()
    o1 = ASPG(m1.parameters(), lr=1e-2, density=0.05, state_dtype="bf16")
    train(m1, o1, data[:4])
    ckpt = copy.deepcopy({"model": m1.state_dict(), "opt": o1.state_dict()})
    train(m1, o1, data[4:])
    m2 = model(seed=5)
    o2 = ASPG(m2.parameters(), lr=1e-2, density=0.05, state_dtype="bf16")
    m2.load_state_dict(ckpt["model"])
    o2.load_state_dict(ckpt["opt"])
    train(m2, o2, data[4:])
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(o1.ef.residuals["flat"], o2.ef.residuals["flat"])  # the rounding generator resumed too
    with pytest.raises(ValueError, match="ASPG options"):
        ASPG(model().parameters(), lr=1e-2, density=0.05).load_state_dict(ckpt["opt"])
    with pytest.raises(ValueError, match="state_dtype must be one of"):
        ASPG(model().parameters(), state_dtype="fp16")
    with pytest.raises(ValueError, match="ema_beta=0.999 > 0.99 freezes it"):
        ASPG(model().parameters(), state_dtype="bf16", ema_beta=0.999)


def test_checkpoint_from_before_state_dtype_loads_as_fp32():
    m = model()
    opt = ASPG(m.parameters(), lr=1e-2, density=0.05)
    train(m, opt, batches(2))
    sd = opt.state_dict()
    del sd["aspg"]["options"]["state_dtype"]  # what an older ASPG wrote
    ASPG(model().parameters(), lr=1e-2, density=0.05).load_state_dict(sd)
    with pytest.raises(ValueError, match="ASPG options"):
        ASPG(model().parameters(), lr=1e-2, density=0.05, state_dtype="bf16").load_state_dict(sd)
