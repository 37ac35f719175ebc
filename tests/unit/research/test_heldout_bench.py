"""benchmarks/bench_heldout.py's verdict logic on fixed inputs: scipy's numbers, the margin from
the pre-registered plan, pilots labelled and deciding nothing, too few seeds inconclusive."""
import sys
from pathlib import Path

import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
import bench_heldout as B  # noqa: E402


def _data(diffs, pilot=False, margin=-0.05):
    seeds = list(range(300, 300 + len(diffs)))
    dense = [0.5 + 0.02 * i for i in range(len(diffs))]
    runs = []
    for s, d, x in zip(seeds, diffs, dense):
        runs.append({"method": "dense", "seed": s, "heldout_accuracy": x, "final_reward": 0.6, "sent_bytes": 1000,
                     "dense_fp32_bytes": 1000})
        runs.append({"method": "aspg-1%", "seed": s, "heldout_accuracy": x + d, "final_reward": 0.6, "sent_bytes": 2,
                     "dense_fp32_bytes": 1000})
    return {"runs": runs, "seeds": seeds, "methods": ["dense", "aspg-1%"], "margin": margin, "pilot": pilot,
            "task": "sort8-sft100", "job": B.JOB, "lr": {"dense": 3e-4, "aspg-1%": 3e-4}}


def test_verdict_matches_scipy_and_the_margin():
    diffs = [0.01, -0.02, 0.03, 0.0, -0.01, 0.02, 0.01, -0.03, 0.02, 0.0]
    data = _data(diffs)
    row = B.summarize(data)[1]
    ref = stats.ttest_1samp(diffs, popmean=-0.05, alternative="greater")
    assert row["p_one_sided"] == pytest.approx(ref.pvalue, rel=1e-6)
    assert row["lower_one_sided"] == pytest.approx(ref.confidence_interval(0.95).low, abs=1e-9)
    ci = stats.ttest_rel([0.5 + 0.02 * i + d for i, d in enumerate(diffs)], [0.5 + 0.02 * i for i in range(10)]).confidence_interval()
    assert row["ci95"] == pytest.approx([ci.low, ci.high], abs=1e-9)
    assert row["verdict"] == "non-inferior" and row["x_vs_fp32_dense"] == 500 and row["x_vs_bf16_dense"] == 250
    data["rows"] = B.summarize(data)
    assert "PASS" in B.render(data)  # 500x >= 300x and non-inferior
    worse = _data([d - 0.06 for d in diffs])
    assert B.summarize(worse)[1]["verdict"] == "not shown non-inferior"


def test_few_seeds_are_inconclusive_and_pilots_decide_nothing():
    assert B.summarize(_data([0.01, 0.0, 0.02]))[1]["verdict"] == "inconclusive"
    data = _data([0.01, 0.0, 0.02, 0.01, 0.0, 0.01], pilot=True)
    data["rows"] = B.summarize(data)
    assert data["rows"][1]["verdict"] == "pilot: decides nothing"
    md = B.render(data)
    assert md.startswith("**PILOT: decides nothing**") and "## targets" not in md


def test_the_plan_fixes_seeds_and_margin_and_tuning_seeds_are_disjoint():
    plan = B._plan()
    assert plan["margin"] < 0 and len(plan["seeds"]) >= 10 and plan["seeds"] == B.SEEDS["evaluate"]
    assert not set(plan["seeds"]) & (set(B.SEEDS["tune"]) | set(B.SEEDS["calibrate"]))
    assert plan["task"] == B.CHOSEN and set(B.LR_FROM.values()) <= set(B.TUNED)
