"""Non-inferiority verdict for two methods of a convergence results file, paired by seed (scipy.stats).

Reads benchmarks/results/NAME.json (written by bench_convergence.py), pairs the final rewards of
`reference` and `candidate` by seed, and tests H0: mean(candidate - reference) <= margin with a
one-sided paired t-test; reports the two-sided 95% paired t interval and Cohen's d_z. The margin
must have been fixed before the run (see the matching *_plan.md). Appends the verdict to NAME.md
and stores it under "noninferiority" in NAME.json.

    python benchmarks/noninferiority.py convergence_split aspg-1%-allgather aspg-1%-split --margin -0.05
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def verdict(ref: list[float], cand: list[float], margin: float, alpha: float = 0.05) -> dict:
    from scipy import stats

    d = [c - r for r, c in zip(ref, cand)]
    n = len(d)
    mean, sd = statistics.mean(d), statistics.stdev(d)
    t_one = stats.ttest_rel(cand, [r + margin for r in ref], alternative="greater")  # H0: mean(d) <= margin
    ci = stats.ttest_rel(cand, ref).confidence_interval(0.95)
    lower_one_sided = mean - stats.t.ppf(1 - alpha, n - 1) * sd / n ** 0.5
    return {"n": n, "mean_diff": mean, "sd_diff": sd, "ci95": [float(ci.low), float(ci.high)],
            "lower_95_one_sided": float(lower_one_sided), "margin": margin, "t": float(t_one.statistic),
            "p_one_sided": float(t_one.pvalue), "cohens_dz": mean / sd if sd else float("inf"),
            "non_inferior": bool(t_one.pvalue < alpha)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("reference")
    ap.add_argument("candidate")
    ap.add_argument("--margin", type=float, required=True, help="non-inferiority margin on candidate - reference")
    a = ap.parse_args()
    path = RESULTS / f"{a.name}.json"
    data = json.loads(path.read_text())
    rows = {r["method"]: r for r in data["rows"]}
    ref, cand = rows[a.reference]["final_rewards"], rows[a.candidate]["final_rewards"]
    v = verdict(ref, cand, a.margin)
    v.update(reference=a.reference, candidate=a.candidate, seeds=data.get("seeds"))
    data["noninferiority"] = v
    path.write_text(json.dumps(data, indent=2) + "\n")
    md = (f"\n## Non-inferiority ({a.candidate} vs {a.reference}; margin fixed before the run)\n\n"
          f"Paired by seed (n = {v['n']}): mean difference {v['mean_diff']:+.4f} (sd {v['sd_diff']:.4f}), "
          f"95% paired t interval [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}], one-sided 95% lower bound "
          f"{v['lower_95_one_sided']:+.4f} vs margin {v['margin']:+.3f}; one-sided paired t = {v['t']:.2f}, "
          f"p = {v['p_one_sided']:.4f} (scipy.stats.ttest_rel); Cohen's d_z {v['cohens_dz']:+.2f}. "
          f"Verdict: **{'non-inferior' if v['non_inferior'] else 'not shown non-inferior'}**.\n")
    with open(RESULTS / f"{a.name}.md", "a") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
