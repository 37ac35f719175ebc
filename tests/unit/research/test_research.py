"""The research matrix: verdicts follow the data (synthetic runs with known outcomes, each verdict
flips when the data does), are computed per optimizer and task kind, say "inconclusive" below
stats.MIN_N runs, and the test preset runs end to end into a report with figures; the committed
report regenerates from its tables.json."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparsecomm.research import analysis as A
from sparsecomm.research import stats as S

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
    only_bf16 = [rec(["size_lr"], lr=lr, seed=s, fp32=0.01, bf16=0.99) for lr in (1e-6, 1e-5) for s in range(5)]
    assert A.verdict_sparse_per_step(only_bf16).outcome == "AdamW/rl: holds only in the bf16 view"
    some_lrs = [rec(["size_lr"], lr=1e-6, seed=s, fp32=0.01, bf16=0.99) for s in range(5)] + \
        [rec(["size_lr"], lr=1e-4, seed=s, fp32=0.0, bf16=0.4) for s in range(5)]
    v = A.verdict_sparse_per_step(some_lrs)
    assert v.outcome == "AdamW/rl: holds only in the bf16 view and only at lr <= 1e-06" and "1e-06" in v.text
    assert A.verdict_sparse_per_step([rec(["size_lr"], seed=s, fp32=0.99, bf16=0.995) for s in range(5)]).outcome == "AdamW/rl: holds"
    assert A.verdict_sparse_per_step([rec(["size_lr"], seed=s, fp32=0.1, bf16=0.5) for s in range(5)]).outcome == \
        "AdamW/rl: does not hold"


def test_too_few_runs_are_inconclusive():
    """Below stats.MIN_N runs (or pairs, or seeds) every verdict says inconclusive, whatever the data shows."""
    few = S.MIN_N - 1
    v = A.verdict_sparse_per_step([rec(["size_lr"], seed=s, fp32=0.99, bf16=0.995) for s in range(few)])
    assert v.outcome.startswith("AdamW/rl: inconclusive")
    ordered = {"attention": 0.90, "mlp": 0.95, "norm": 0.99}
    assert A.verdict_layer_order([rec(["x"], kinds=ordered)] * few).outcome == "AdamW/rl: inconclusive"
    assert A.verdict_sparser_over_time([rec(["x"], early=0.5, late=0.9)] * few).outcome == "AdamW/rl: inconclusive"
    pairs = [r for s in range(few) for r in (rec(["task"], phase="rl", seed=s, bf16=0.9, fp32=0.1),
                                             rec(["task"], phase="sft", seed=s, bf16=0.8, fp32=0.05))]
    assert A.verdict_rl_sparser_than_sft(pairs).outcome == "AdamW: inconclusive"
    h1 = [rec(["h1"], variant=v, seed=s, reward_last=r + 0.01 * s) for s in range(few)
          for v, r in (("dense", 0.7), ("aspg-1%", 0.2), ("randomk-1%", 0.1))]
    assert A.verdict_h1(h1).outcome == "inconclusive"
    h3 = [rec(["h3"], variant=v, seed=s, reward_last=r + 0.01 * s) for s in range(few)
          for v, r in (("global-1%", 0.5), ("per-tensor-1%", 0.5), ("per-kind-1%", 0.8))]
    assert A.verdict_h3(h3).outcome == "inconclusive"
    assert A.verdict_h2([rec(["size_lr"], bf16=x, fp32=x, reward_gain=x) for x in (0.1, 0.2, 0.3)]).outcome == \
        "AdamW/rl: inconclusive"


def test_verdicts_are_per_optimizer_never_pooled():
    """AdamW gets sparser over time in every run, SGD in none: pooled that would read "mixed"."""
    runs = [rec(["optimizer"], seed=s, early=0.5, late=0.9) for s in range(6)] + \
        [{**rec(["optimizer"], seed=s, early=0.9, late=0.5), "optimizer": "sgd"} for s in range(6)]
    v = A.verdict_sparser_over_time(runs)
    assert v.outcome == "AdamW/rl: holds; SGD/rl: does not hold"
    assert v.numbers["AdamW/rl"]["bf16_view"]["n"] == 6 and "exact sign test" in v.text and "95% CI" in v.text
    # task kinds are separate strata too, and bf16-precision runs are left out of fp32 claims
    sft = [rec(["task"], phase="sft", seed=s, early=0.9, late=0.5) for s in range(6)]
    bf16 = [rec(["precision"], precision="bf16", seed=s, early=0.9, late=0.5) for s in range(6)]
    assert A.verdict_sparser_over_time(runs + sft + bf16).outcome == \
        "AdamW/rl: holds; AdamW/sft: does not hold; SGD/rl: does not hold"


def test_layer_order_verdict_flips_with_the_data():
    ordered = {"attention": 0.90, "mlp": 0.95, "norm": 0.99}
    reversed_ = {"attention": 0.99, "mlp": 0.95, "norm": 0.90}
    assert A.verdict_layer_order([rec(["x"], kinds=ordered)] * 6).outcome == "AdamW/rl: holds"
    assert A.verdict_layer_order([rec(["x"], kinds=reversed_)] * 6).outcome == "AdamW/rl: does not hold"
    assert A.verdict_layer_order([rec(["x"], kinds=ordered)] * 3 + [rec(["x"], kinds=reversed_)] * 3).outcome == \
        "AdamW/rl: mixed"


def test_sparser_over_time_verdict_flips_with_the_data():
    assert A.verdict_sparser_over_time([rec(["x"], early=0.5, late=0.9)] * 6).outcome == "AdamW/rl: holds"
    assert A.verdict_sparser_over_time([rec(["x"], early=0.9, late=0.5)] * 6).outcome == "AdamW/rl: does not hold"


def test_rl_vs_sft_is_judged_at_matched_rates_only():
    def pairs(n, rl_bf16, sft_bf16, lr=1e-5):
        return [r for s in range(n) for r in (rec(["task"], phase="rl", lr=lr, seed=s, bf16=rl_bf16 + 0.001 * s, fp32=0.1),
                                              rec(["task"], phase="sft", lr=lr, seed=s, bf16=sft_bf16, fp32=0.05))]
    v = A.verdict_rl_sparser_than_sft(pairs(5, 0.9, 0.8))
    assert v.outcome == "AdamW: holds" and "n=5" in v.text and "paired t" in v.text
    assert A.published_comparison(v).startswith("consistent")
    assert A.verdict_rl_sparser_than_sft(pairs(5, 0.7, 0.8)).outcome == "AdamW: holds only in fp32"
    # pairs at different rates (the customary ones) are reported but never decide
    customary = [r for s in range(5) for r in (rec(["task_customary"], phase="rl", lr=3e-4, seed=s, bf16=0.9, fp32=0.1),
                                               rec(["task_customary"], phase="sft", lr=1e-3, seed=s, bf16=0.5, fp32=0.0))]
    v = A.verdict_rl_sparser_than_sft(customary + pairs(3, 0.9, 0.8))
    assert v.outcome == "AdamW: inconclusive" and "not a test" in v.text


def _h1(aspg, seeds=5):
    return [rec(["h1"], variant="dense", seed=s, reward_last=0.70 + 0.01 * s) for s in range(seeds)] + \
        [rec(["h1"], variant="aspg-1%", seed=s, reward_last=aspg + 0.012 * s) for s in range(seeds)] + \
        [rec(["h1"], variant="randomk-1%", seed=s, reward_last=0.3 + 0.01 * s) for s in range(seeds)]


def test_h1_and_h3_pair_by_seed():
    assert A.verdict_h1(_h1(0.50)).outcome == "sparsity hurts"
    assert A.verdict_h1(_h1(0.90)).outcome == "sparsity helps"
    noisy = _h1(0.70) + []
    for r in noisy:  # seed-to-seed noise that the pairing does not remove
        if r["variant"] == "aspg-1%":
            r["reward_last"] += 0.05 * (-1) ** r["seed"]
    v = A.verdict_h1(noisy)
    assert v.outcome == "no detectable effect" and "beats" in v.text and "paired t, n=5" in v.text
    assert v.numbers["aspg-1% - dense"]["n"] == 5
    # the paired t interval is scipy's: check it against ttest_rel on the same numbers
    from scipy import stats
    a = [r["reward_last"] for r in noisy if r["variant"] == "aspg-1%"]
    b = [r["reward_last"] for r in noisy if r["variant"] == "dense"]
    ci = stats.ttest_rel(a, b).confidence_interval()
    assert v.numbers["aspg-1% - dense"]["ci95"] == pytest.approx([ci.low, ci.high])
    magnitude = [rec(["h1"], variant="magnitude-1%", seed=s, reward_last=0.55 + 0.01 * s) for s in range(5)]
    assert "the default is better" in A.verdict_h1(_h1(0.705) + magnitude).text
    assert "the default is worse" in A.verdict_h1(_h1(0.40) + magnitude).text
    h3 = [rec(["h3"], variant=v, seed=s, reward_last=r + 0.01 * s) for s in range(5)
          for v, r in (("global-1%", 0.5), ("per-tensor-1%", 0.5), ("per-kind-1%", 0.8))]
    assert A.verdict_h3(h3).outcome == "per-kind budgets help"


def test_h2_correlation_and_its_interval():
    xs = [i / 10 for i in range(10)]
    pos = [rec(["size_lr"], bf16=x, fp32=x, reward_gain=2 * x + 0.01 * (i % 3)) for i, x in enumerate(xs)]
    v = A.verdict_h2(pos)
    assert v.outcome == "AdamW/rl: predicts reward gain within a learning rate: positively (fp32_exact), positively (bf16_view)"
    assert v.numbers["AdamW/rl"]["bf16_view"]["r"] > 0.99
    # the rate alone: sparser and better between rates, unrelated within each rate -> "only across learning rates"
    by_rate = [rec(["size_lr"], lr=lr, bf16=b + 0.01 * i, fp32=b + 0.01 * i, reward_gain=b + 0.05 * (-1) ** i)
               for lr, b in ((1e-6, 0.9), (1e-5, 0.5), (1e-4, 0.1)) for i in range(6)]
    assert A.verdict_h2(by_rate).outcome.startswith("AdamW/rl: only across learning rates (positively")
    noise = [rec(["size_lr"], bf16=x, fp32=x, reward_gain=(-1) ** i) for i, x in enumerate(xs)]
    assert A.verdict_h2(noise).outcome == "AdamW/rl: no evidence"
    other_reward = [{**r, "reward": "helpful"} for r in pos]  # gains under another reward are not on one scale
    assert A.verdict_h2(noise + other_reward).numbers["AdamW/rl"]["bf16_view"]["n"] == len(noise)


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
    bf16_only = A.verdict_sparse_per_step([rec(["size_lr"], lr=lr, seed=s, fp32=0.01, bf16=0.99)
                                           for lr in (1e-6, 1e-5) for s in range(5)])
    assert A.published_comparison(bf16_only).startswith("consistent")  # PULSE: a bf16-view effect
    both = A.verdict_sparse_per_step([rec(["size_lr"], seed=s, fp32=0.99, bf16=0.995) for s in range(5)])
    assert A.published_comparison(both).startswith("inconsistent")
    few = A.verdict_sparse_per_step([rec(["size_lr"], seed=s, fp32=0.01, bf16=0.99) for s in range(2)])
    assert A.published_comparison(few).startswith("inconclusive")
    uniform = A.verdict_layer_order([rec(["x"], kinds={"attention": 0.90, "mlp": 0.91, "norm": 0.92})] * 5)
    spread = A.verdict_layer_order([rec(["x"], kinds={"attention": 0.50, "mlp": 0.70, "norm": 0.95})] * 5)
    assert A.published_comparison(uniform).startswith("consistent")
    assert A.published_comparison(spread).startswith("inconsistent")


def test_committed_report_rederives_from_its_tables(tmp_path):
    """The committed report regenerates from tables.json alone (no run directories), and the
    verdicts it prints are the ones analysis derives from those records."""
    pytest.importorskip("matplotlib")
    import shutil

    from sparsecomm.research.report import write_report

    src = ROOT / "benchmarks/results/research"
    for name in ("tables.json", "matrix.json"):
        shutil.copy(src / name, tmp_path / name)
    (tmp_path / "figures").mkdir()
    shutil.copy(src / "figures/fig1_sparsity_vs_step.png", tmp_path / "figures")
    report = write_report(tmp_path).read_text()
    verdicts = A.all_verdicts(A.load_tables(src / "tables.json"))
    assert len(verdicts) == 7
    for v in verdicts:
        assert f"**{v.outcome}**" in report
    assert f"--out {tmp_path} --report-only" in report and "figures/fig1_sparsity_vs_step.png" in report
    for fig in ("fig2_layers", "fig3_rank", "fig_kstep", "fig_h2"):
        assert (tmp_path / "figures" / f"{fig}.png").stat().st_size > 5000
    # and again from the tables it just wrote: the same verdicts
    again = json.loads((tmp_path / "tables.json").read_text())
    assert [v["outcome"] for v in again["verdicts"]] == [v.outcome for v in verdicts]
    assert [v.outcome for v in A.all_verdicts(A.load_tables(tmp_path / "tables.json"))] == [v.outcome for v in verdicts]
