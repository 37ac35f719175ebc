"""The research matrix: verdicts follow the data (synthetic runs with known outcomes, each verdict
flips when the data does), and the test preset runs end to end into a report with figures."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from sparsecomm.research import analysis as A

ROOT = Path(__file__).resolve().parents[3]


def rec(groups, *, lr=1e-5, phase="rl", model="tiny", seed=0, precision="fp32", variant="", fp32=0.0, bf16=0.99,
        kinds=None, early=None, late=None, reward_last=0.5, reward_gain=0.1):
    r = {"groups": tuple(groups), "lr": lr, "phase": phase, "model": model, "seed": seed, "precision": precision,
         "variant": variant, "reward": "default", "optimizer": "adamw", "reward_last": reward_last, "reward_gain": reward_gain}
    for view, v in (("fp32_exact", fp32), ("bf16_view", bf16)):
        r[f"sparsity/{view}"] = v
        r[f"sparsity_early/{view}"] = v if early is None else early
        r[f"sparsity_late/{view}"] = v if late is None else late
        for k, kv in (kinds or {"attention": v, "mlp": v, "norm": v}).items():
            r[f"kind/{view}/{k}"] = kv
    return r


def test_sparse_per_step_verdict_follows_the_views_and_rates():
    only_bf16 = [rec(["size_lr"], lr=lr, fp32=0.01, bf16=0.99) for lr in (1e-6, 1e-5)]
    assert A.verdict_sparse_per_step(only_bf16).outcome == "holds only in the bf16 view"
    some_lrs = [rec(["size_lr"], lr=1e-6, fp32=0.01, bf16=0.99), rec(["size_lr"], lr=1e-4, fp32=0.0, bf16=0.4)]
    v = A.verdict_sparse_per_step(some_lrs)
    assert v.outcome == "holds only in the bf16 view and only at some learning rates" and "1e-06" in v.text
    assert A.verdict_sparse_per_step([rec(["size_lr"], fp32=0.99, bf16=0.995)]).outcome == "holds"
    assert A.verdict_sparse_per_step([rec(["size_lr"], fp32=0.1, bf16=0.5)]).outcome == "does not hold"


def test_layer_order_verdict_flips_with_the_data():
    ordered = {"attention": 0.90, "mlp": 0.95, "norm": 0.99}
    reversed_ = {"attention": 0.99, "mlp": 0.95, "norm": 0.90}
    assert A.verdict_layer_order([rec(["x"], kinds=ordered)] * 4).outcome == "holds"
    assert A.verdict_layer_order([rec(["x"], kinds=reversed_)] * 4).outcome == "does not hold"
    assert A.verdict_layer_order([rec(["x"], kinds=ordered)] * 2 + [rec(["x"], kinds=reversed_)] * 2).outcome == "mixed"


def test_sparser_over_time_verdict_flips_with_the_data():
    assert A.verdict_sparser_over_time([rec(["x"], early=0.5, late=0.9)] * 3).outcome == "holds"
    assert A.verdict_sparser_over_time([rec(["x"], early=0.9, late=0.5)] * 3).outcome == "does not hold"


def test_rl_vs_sft_verdict_separates_same_and_customary_rates():
    same = [rec(["task"], phase="rl", bf16=0.9, fp32=0.1), rec(["task"], phase="sft", bf16=0.8, fp32=0.05)]
    cust_rev = [rec(["task_customary"], phase="rl", lr=3e-4, bf16=0.5, fp32=0.0),
                rec(["task_customary"], phase="sft", lr=1e-3, bf16=0.6, fp32=0.01)]
    assert A.verdict_rl_sparser_than_sft(same + [{**cust_rev[0], "sparsity/bf16_view": 0.7, "sparsity/fp32_exact": 0.02},
                                                 cust_rev[1]]).outcome == "holds"
    v = A.verdict_rl_sparser_than_sft(same + cust_rev)
    assert v.outcome == "at the same lr: holds; at customary lrs: does not hold"


def test_h1_and_h3_compare_against_the_seed_spread():
    def h1(aspg):
        return [rec(["h1"], variant="dense", seed=s, reward_last=0.70 + 0.01 * s) for s in range(3)] + \
            [rec(["h1"], variant="aspg-1%", seed=s, reward_last=aspg + 0.01 * s) for s in range(3)] + \
            [rec(["h1"], variant="randomk-1%", seed=s, reward_last=0.3 + 0.01 * s) for s in range(3)]
    assert A.verdict_h1(h1(0.50)).outcome == "sparsity hurts"
    assert A.verdict_h1(h1(0.90)).outcome == "sparsity helps"
    v = A.verdict_h1(h1(0.705))
    assert v.outcome == "no detectable effect" and "beats" in v.text  # vs random-k: clearly better
    magnitude = [rec(["h1"], variant="magnitude-1%", seed=s, reward_last=0.55 + 0.01 * s) for s in range(3)]
    assert "(default) vs by |residual| +0.155" in A.verdict_h1(h1(0.705) + magnitude).text
    assert "the default is better" in A.verdict_h1(h1(0.705) + magnitude).text
    assert "the default is worse" in A.verdict_h1(h1(0.40) + magnitude).text
    h3 = [rec(["h3"], variant=v, seed=s, reward_last=r + 0.01 * s) for s in range(3)
          for v, r in (("global-1%", 0.5), ("per-tensor-1%", 0.5), ("per-kind-1%", 0.8))]
    assert A.verdict_h3(h3).outcome == "per-kind budgets help"


def test_h2_correlation_and_its_interval():
    xs = [i / 10 for i in range(10)]
    pos = [rec(["size_lr"], bf16=x, fp32=x, reward_gain=2 * x + 0.01 * (i % 3)) for i, x in enumerate(xs)]
    v = A.verdict_h2(pos)
    assert v.outcome == "sparsity predicts reward gain within a learning rate: positively (fp32_exact); positively (bf16_view)"
    assert v.numbers["bf16_view"]["r"] > 0.99
    # the rate alone: sparser and better between rates, unrelated within each rate -> "only across learning rates"
    by_rate = [rec(["size_lr"], lr=lr, bf16=b + 0.01 * i, fp32=b + 0.01 * i, reward_gain=b + 0.05 * (-1) ** i)
               for lr, b in ((1e-6, 0.9), (1e-5, 0.5), (1e-4, 0.1)) for i in range(6)]
    assert A.verdict_h2(by_rate).outcome.startswith("only across learning rates (positively")
    noise = [rec(["size_lr"], bf16=x, fp32=x, reward_gain=(-1) ** i) for i, x in enumerate(xs)]
    assert A.verdict_h2(noise).outcome == "no evidence"
    r, lo, hi, n = A.pearson_ci([0, 1, 2, 3, 4], [0, 1, 2, 3, 5])
    assert n == 5 and lo < r < hi and r > 0.9
    assert math.isnan(A.pearson_ci([1, 2], [1, 2])[0])


def test_summarize_rows_windows_and_kinds():
    rows = [{"sparsity/fp32_exact/global": 0.0, "sparsity/bf16_view/global": i / 7, "sparsity/bf16_view/kind/mlp": 0.5,
             "train/reward": float(i), "sparsity_k10/bf16_view/global": 0.3} for i in range(8)]
    s = A.summarize_rows(rows)
    assert s["sparsity_early/bf16_view"] == pytest.approx(1 / 14) and s["sparsity_late/bf16_view"] == pytest.approx(13 / 14)
    assert s["kind/bf16_view/mlp"] == 0.5 and s["kstep10/bf16_view"] == 0.3
    assert s["reward_gain"] == pytest.approx(6.0)


@pytest.mark.timeout(600)
def test_test_preset_end_to_end(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    cmd = [sys.executable, "-m", "sparsecomm.cli", "matrix", "--preset", "test", "--out", str(tmp_path), "--jobs", "2"]
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(ROOT))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = (tmp_path / "REPORT.md").read_text()
    tables = json.loads((tmp_path / "tables.json").read_text())
    assert len(tables["verdicts"]) == 7
    for v in tables["verdicts"]:  # every verdict in the report is the one derived from the data
        assert f"**{v['outcome']}**" in report
    for fig in ("fig1_sparsity_vs_step", "fig2_layers", "fig3_rank", "fig_hot", "fig_kstep", "fig_h1_h3_reward", "fig_h2"):
        assert (tmp_path / "figures" / f"{fig}.png").stat().st_size > 5000
    # resumable: a second invocation finds every run done
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=str(ROOT))
    assert "0 to run" in r2.stdout


def test_published_comparison_follows_the_verdict():
    bf16_only = A.verdict_sparse_per_step([rec(["size_lr"], lr=lr, fp32=0.01, bf16=0.99) for lr in (1e-6, 1e-5)])
    assert A.published_comparison(bf16_only) == "consistent"  # PULSE: a bf16-view effect
    both = A.verdict_sparse_per_step([rec(["size_lr"], fp32=0.99, bf16=0.995)])
    assert A.published_comparison(both) == "inconsistent"
    uniform = A.verdict_layer_order([rec(["x"], kinds={"attention": 0.90, "mlp": 0.91, "norm": 0.92})] * 3)
    spread = A.verdict_layer_order([rec(["x"], kinds={"attention": 0.50, "mlp": 0.70, "norm": 0.95})] * 3)
    assert A.published_comparison(uniform).startswith("consistent")
    assert A.published_comparison(spread).startswith("inconsistent")
