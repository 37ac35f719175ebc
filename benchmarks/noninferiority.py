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
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def verdict(ref: list[float], cand: list[float], margin: float, alpha: float = 0.05) -> dict:
    """`margin` <= 0 on candidate - reference (e.g. -0.05); sparsecomm.research.stats does the scipy work."""
    from sparsecomm.research import stats

    ni = stats.non_inferiority(cand, ref, abs(margin), alpha)  # one-sided ttest_1samp of d against the margin
    diff = stats.paired(cand, ref)  # two-sided 95% paired t interval, Cohen's d_z
    return {"n": ni.n, "mean_diff": ni.diff, "ci95": list(diff.ci), "lower_95_one_sided": ni.lower,
            "margin": -abs(margin), "p_one_sided": ni.p, "cohens_dz": diff.effect,
            "non_inferior": bool(ni.p < alpha)}


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
          f"Paired by seed (n = {v['n']}): mean difference {v['mean_diff']:+.4f}, "
          f"95% paired t interval [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}], one-sided 95% lower bound "
          f"{v['lower_95_one_sided']:+.4f} vs margin {v['margin']:+.3f}; one-sided p = {v['p_one_sided']:.4f} "
          f"(scipy.stats.ttest_1samp of the paired differences against the margin); Cohen's d_z {v['cohens_dz']:+.2f}. "
          f"Verdict: **{'non-inferior' if v['non_inferior'] else 'not shown non-inferior'}**.\n")
    with open(RESULTS / f"{a.name}.md", "a") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
