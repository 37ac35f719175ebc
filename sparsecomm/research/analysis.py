"""From matrix runs to numbers and verdicts; pure functions of the data, so tests can feed synthetic runs.

A run record (`load_runs`) is a flat dict: the run's spec (model, lr, optimizer, phase, reward,
precision, seed, steps, variant, groups) plus summaries of its StepStats:

    sparsity/<def>            mean over steps of the per-step global sparsity (fraction unchanged)
    sparsity_early/<def>      ... over the first quarter of the steps; sparsity_late/<def>: last quarter
    kind/<def>/<kind>         mean per-step sparsity of one layer kind
    kstep<K>/<def>            mean accumulated sparsity between weights K steps apart
    lr_over_median_abs_w      lr / median |w| (the bf16 effect depends on it)
    reward_first, reward_last mean sampled reward over the first / last window (RL runs)
    reward_curve              the per-step reward (RL runs)
    rank/...                  per-matrix stable and entropy rank / min(m, n), random baseline, stacked
    hot_frac                  fraction of weights changed in more than half the steps of a hot-map window

Verdict functions take a list of records and return a Verdict: an outcome string from a fixed
vocabulary, the numbers behind it, and one sentence. Nothing in REPORT.md is written by hand.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

DEFS = ("fp32_exact", "bf16_view", "rel_threshold", "abs_threshold")
VIEWS = ("fp32_exact", "bf16_view")  # the two the plan's claims are judged in
KINDS_ORDER = ("attention", "mlp", "norm")  # the plan: attention < FFN < LayerNorm (in sparsity)
HOLD = 0.98  # "98-99% of weights unchanged per step"
MAJORITY = 0.75  # a claim holds when it holds in at least this fraction of the comparisons


@dataclass
class Verdict:
    claim: str
    outcome: str
    text: str
    numbers: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------ loading

def _mean(xs):
    xs = [x for x in xs if isinstance(x, (int, float)) and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def summarize_rows(rows: list[dict]) -> dict:
    """Per-run summaries of a run's StepStats metrics rows (rank 0, in step order)."""
    rec: dict = {}
    n = len(rows)
    q = max(1, n // 4)
    for d in DEFS:
        key = f"sparsity/{d}/global"
        rec[f"sparsity/{d}"] = _mean(r.get(key) for r in rows)
        rec[f"sparsity_early/{d}"] = _mean(r.get(key) for r in rows[:q])
        rec[f"sparsity_late/{d}"] = _mean(r.get(key) for r in rows[-q:])
        rec[f"curve/{d}"] = [r.get(key, float("nan")) for r in rows]
    for k in sorted({k for r in rows for k in r}):
        parts = k.split("/")
        if k.startswith("sparsity/") and len(parts) == 4 and parts[2] == "kind":
            rec[f"kind/{parts[1]}/{parts[3]}"] = _mean(r.get(k) for r in rows)
        elif k.startswith("sparsity_k") and k.endswith("/global"):
            rec[f"kstep{parts[0][len('sparsity_k'):]}/{parts[1]}"] = _mean(r.get(k) for r in rows)
        elif k.startswith(("rank/grad/", "rank/stacked")):
            rec[k] = _mean(r.get(k) for r in rows)
        elif k.startswith("hot/frac_changed_gt_half/") and (k.endswith("/global") or "/kind/" in k):
            rec["hot_frac" + k[len("hot/frac_changed_gt_half"):]] = _mean(r.get(k) for r in rows)
    rec["lr_over_median_abs_w"] = _mean(r.get("update/lr_over_median_abs_w") for r in rows)
    rec["median_abs_w"] = _mean(r.get("update/median_abs_w") for r in rows)
    rewards = [r.get("train/reward", float("nan")) for r in rows]
    w = max(1, min(50, n // 4))
    rec["reward_curve"] = rewards
    rec["reward_first"], rec["reward_last"] = _mean(rewards[:w]), _mean(rewards[-w:])
    rec["reward_gain"] = rec["reward_last"] - rec["reward_first"]
    losses = [r.get("train/loss", float("nan")) for r in rows]
    rec["loss_first"], rec["loss_last"] = _mean(losses[:w]), _mean(losses[-w:])
    rec["sent_bytes"] = sum(r["comm/sent_bytes"] for r in rows if isinstance(r.get("comm/sent_bytes"), (int, float)))
    # what ASPG encoded for its exchange (one process sends nothing, but the payload is what P workers would send)
    rec["payload_bytes"] = sum(r["comm/payload_bytes"] for r in rows if isinstance(r.get("comm/payload_bytes"), (int, float)))
    rec["steps_recorded"] = n
    return rec


def load_runs(out: Path) -> list[dict]:
    """Every finished run under OUT/runs (those with summary.json), as records."""
    records = []
    for d in sorted((out / "runs").glob("*")):
        if not (d / "summary.json").exists() or not (d / "spec.json").exists():
            continue
        spec = json.loads((d / "spec.json").read_text())
        rows = [json.loads(line)["metrics"] for line in (d / "stats_rank0.jsonl").read_text().splitlines() if line]
        summary = json.loads((d / "summary.json").read_text())
        rec = {**spec, **summarize_rows(rows), "dir": str(d),
               "accuracy_before": summary.get("eval_accuracy_before_rl"), "accuracy_after": summary.get("eval_accuracy_after_rl")}
        rec["groups"] = tuple(rec.get("groups", ()))
        records.append(rec)
    return records


def select(records, group: str | None = None, **match) -> list[dict]:
    return [r for r in records if (group is None or group in r["groups"]) and all(r.get(k) == v for k, v in match.items())]


# ------------------------------------------------------------------------------ statistics

def mean_sd(xs) -> tuple[float, float, int]:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan"), 0
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def pearson_ci(x: list[float], y: list[float], z: float = 1.96, n_adjust: int = 0) -> tuple[float, float, float, int]:
    """Pearson r with a Fisher-z 95% confidence interval: (r, lo, hi, n); nan when n < 4 or constant.
    `n_adjust` removes degrees of freedom (group means subtracted beforehand)."""
    pts = [(a, b) for a, b in zip(x, y) if not (math.isnan(a) or math.isnan(b))]
    n = len(pts)
    if n < 4:
        return float("nan"), float("nan"), float("nan"), n
    mx, my = _mean(p[0] for p in pts), _mean(p[1] for p in pts)
    sxx = sum((a - mx) ** 2 for a, _ in pts)
    syy = sum((b - my) ** 2 for _, b in pts)
    if sxx == 0 or syy == 0:
        return float("nan"), float("nan"), float("nan"), n
    r = sum((a - mx) * (b - my) for a, b in pts) / math.sqrt(sxx * syy)
    r = max(min(r, 0.999999), -0.999999)
    if n - 3 - n_adjust < 1:
        return r, float("nan"), float("nan"), n
    fz, se = math.atanh(r), 1 / math.sqrt(n - 3 - n_adjust)
    return r, math.tanh(fz - z * se), math.tanh(fz + z * se), n


def compare(a: list[float], b: list[float], z: float = 1.96) -> tuple[str, float, float]:
    """Is mean(a) above, below or indistinguishable from mean(b)?  Welch-style: the difference of
    means against z standard errors (seed-to-seed spread). Returns (above|below|same, diff, margin)."""
    ma, sa, na = mean_sd(a)
    mb, sb, nb = mean_sd(b)
    if not na or not nb:
        return "same", float("nan"), float("nan")
    margin = z * math.sqrt((sa ** 2) / na + (sb ** 2) / nb)
    diff = ma - mb
    if diff > margin:
        return "above", diff, margin
    if diff < -margin:
        return "below", diff, margin
    return "same", diff, margin


def _fmt_lr(lr) -> str:
    return f"{lr:g}"


# ------------------------------------------------------------------------------ the plan's expected outcomes

def verdict_sparse_per_step(records) -> Verdict:
    """Plan: 98-99% of weights unchanged per step. Judged per view and learning rate on the
    size x lr group (AdamW, GRPO, fp32 master weights)."""
    runs = select(records, "size_lr")
    lrs = sorted({r["lr"] for r in runs})
    holds = {}
    nums = {}
    for view in VIEWS:
        for lr in lrs:
            vals = [r[f"sparsity/{view}"] for r in runs if r["lr"] == lr]
            frac = sum(v >= HOLD for v in vals) / len(vals) if vals else float("nan")
            holds[(view, lr)] = frac >= MAJORITY
            nums[f"{view} lr={_fmt_lr(lr)}"] = {"mean_sparsity": _mean(vals), "runs": len(vals), "frac_runs_ge_98%": frac}
    fp32_all = all(holds[("fp32_exact", lr)] for lr in lrs)
    bf16_lrs = [lr for lr in lrs if holds[("bf16_view", lr)]]
    fp32_lrs = [lr for lr in lrs if holds[("fp32_exact", lr)]]
    if lrs and fp32_all:
        outcome, text = "holds", "at least 98% of fp32 master weights are unchanged per step at every learning rate tested"
    elif bf16_lrs and not fp32_lrs:
        where = "at every learning rate tested" if len(bf16_lrs) == len(lrs) else \
            f"only at lr <= {_fmt_lr(max(bf16_lrs))}"
        outcome = "holds only in the bf16 view" + ("" if len(bf16_lrs) == len(lrs) else " and only at some learning rates")
        text = f"in fp32 master weights almost every weight changes every step; in the bf16 view >= 98% are unchanged {where}"
    elif bf16_lrs or fp32_lrs:
        outcome = "holds only at some learning rates"
        text = (f"fp32: lr in {[_fmt_lr(x) for x in fp32_lrs]}; bf16 view: lr in {[_fmt_lr(x) for x in bf16_lrs]}")
    else:
        outcome, text = "does not hold", "no view reaches 98% unchanged per step at any learning rate tested"
    return Verdict("98-99% of weights unchanged per step", outcome, text, nums)


def verdict_layer_order(records) -> Verdict:
    """Plan: attention < FFN < LayerNorm in sparsity. Judged per view over all fp32 runs that
    recorded the three kinds."""
    nums, holds = {}, {}
    for view in VIEWS:
        runs = [r for r in records if r["precision"] == "fp32" and all(f"kind/{view}/{k}" in r for k in KINDS_ORDER)]
        ok = [r[f"kind/{view}/attention"] < r[f"kind/{view}/mlp"] < r[f"kind/{view}/norm"] for r in runs]
        frac = sum(ok) / len(ok) if ok else float("nan")
        holds[view] = frac
        nums[view] = {"runs": len(ok), "frac_runs_ordered": frac,
                      **{f"mean_{k}": _mean(r[f"kind/{view}/{k}"] for r in runs) for k in KINDS_ORDER}}
    return _by_view("attention < FFN < LayerNorm (sparsity by layer kind)", holds, nums,
                    "fraction of runs with sparsity(attention) < sparsity(mlp) < sparsity(norm)")


def verdict_sparser_over_time(records) -> Verdict:
    """Plan: updates get sparser over training. Late-quarter vs early-quarter sparsity per run."""
    nums, holds = {}, {}
    runs = [r for r in records if r["phase"] == "rl" and r["precision"] == "fp32"]
    for view in VIEWS:
        diffs = [r[f"sparsity_late/{view}"] - r[f"sparsity_early/{view}"] for r in runs]
        diffs = [d for d in diffs if not math.isnan(d)]
        frac = sum(d > 0 for d in diffs) / len(diffs) if diffs else float("nan")
        holds[view] = frac
        nums[view] = {"runs": len(diffs), "frac_runs_sparser_late": frac, "mean_late_minus_early": _mean(diffs)}
    return _by_view("updates get sparser over time", holds, nums, "fraction of RL runs whose last-quarter sparsity "
                    "exceeds their first-quarter sparsity")


def view_outcome(frac_by_view: dict) -> str:
    """From the fraction of comparisons in which a claim holds, per view, to an outcome."""
    if any(f != f for f in frac_by_view.values()):
        return "no data"
    ok = {v: f >= MAJORITY for v, f in frac_by_view.items()}
    no = {v: f <= 1 - MAJORITY for v, f in frac_by_view.items()}
    if all(ok.values()):
        return "holds"
    if ok.get("bf16_view") and not ok.get("fp32_exact"):
        return "holds only in the bf16 view"
    if ok.get("fp32_exact") and not ok.get("bf16_view"):
        return "holds only in fp32"
    if all(no.values()):
        return "does not hold"
    return "mixed"


def _by_view(claim: str, frac_by_view: dict, nums: dict, what: str) -> Verdict:
    text = f"{what}: " + ", ".join(f"{v} {f:.0%}" for v, f in frac_by_view.items())
    return Verdict(claim, view_outcome(frac_by_view), text, nums)


def verdict_rl_sparser_than_sft(records) -> Verdict:
    """Plan: RL updates are sparser than SFT updates. Matched pairs (same model, optimizer, seed),
    at the same learning rate and at each phase's customary rate."""
    nums, res = {}, {}
    for label, group in (("same lr", "task"), ("customary lr", "task_customary")):
        runs = select(records, group)
        for view in VIEWS:
            pairs = []
            for r in runs:
                if r["phase"] != "rl":
                    continue
                for s in runs:
                    if s["phase"] == "sft" and s["seed"] == r["seed"] and s["model"] == r["model"] and \
                            (group == "task_customary" or s["lr"] == r["lr"]):
                        pairs.append((r[f"sparsity/{view}"], s[f"sparsity/{view}"], r["lr"]))
            frac = sum(a > b for a, b, _ in pairs) / len(pairs) if pairs else float("nan")
            res[(label, view)] = frac
            nums[f"{label}, {view}"] = {"pairs": len(pairs), "frac_rl_sparser": frac,
                                        "mean_rl": _mean(a for a, _, _ in pairs), "mean_sft": _mean(b for _, b, _ in pairs)}
    same = {v: res[("same lr", v)] for v in VIEWS}
    cust = {v: res[("customary lr", v)] for v in VIEWS}
    o_same, o_cust = view_outcome(same), view_outcome(cust)
    outcome = o_same if o_same == o_cust else f"at the same lr: {o_same}; at customary lrs: {o_cust}"
    text = ("fraction of matched (rl, sft) pairs where RL is sparser: same lr "
            + ", ".join(f"{v} {same[v]:.0%}" for v in VIEWS) + "; customary lr "
            + ", ".join(f"{v} {cust[v]:.0%}" for v in VIEWS)
            + " (customary: RL's lower rate vs SFT's higher one, where a difference can come from the rate alone)")
    return Verdict("RL updates are sparser than SFT updates", outcome, text, nums)


# ------------------------------------------------------------------------------ hypotheses

def _final_rewards(runs, variant: str) -> list[float]:
    return [r["reward_last"] for r in runs if r.get("variant") == variant]


def verdict_h1(records) -> Verdict:
    """H1: does enforcing sparsity help or hurt? ASPG top-k vs dense vs random-k at equal density
    and equal steps: final reward (mean of the last window) over seeds."""
    runs = select(records, "h1")
    dense = _final_rewards(runs, "dense")
    nums, parts, outcomes = {"dense": dict(zip(("mean", "sd", "n"), mean_sd(dense)))}, [], []
    for tag in sorted({r["variant"].split("-", 1)[1] for r in runs if r["variant"].startswith("aspg-")}):
        aspg, rnd = _final_rewards(runs, f"aspg-{tag}"), _final_rewards(runs, f"randomk-{tag}")
        c_dense, d1, m1 = compare(aspg, dense)
        c_rand, d2, m2 = compare(aspg, rnd)
        nums[f"aspg-{tag}"] = dict(zip(("mean", "sd", "n"), mean_sd(aspg)))
        nums[f"randomk-{tag}"] = dict(zip(("mean", "sd", "n"), mean_sd(rnd)))
        effect = {"above": "helps", "below": "hurts", "same": "no detectable effect"}[c_dense]
        outcomes.append(effect)
        parts.append(f"at {tag}: ASPG vs dense {d1:+.3f} (margin {m1:.3f}) -> {effect}; ASPG vs random-k {d2:+.3f} "
                     f"(margin {m2:.3f}) -> importance ranking {'beats' if c_rand == 'above' else 'loses to' if c_rand == 'below' else 'ties'} random")
    magnitude, default = _final_rewards(runs, "magnitude-1%"), _final_rewards(runs, "aspg-1%")
    if magnitude and default:  # the importance rule itself: |e x EMA(g)| vs |e|
        c, d, m = compare(default, magnitude)
        nums["magnitude-1%"] = dict(zip(("mean", "sd", "n"), mean_sd(magnitude)))
        parts.append(f"at 1%: ranking by |residual x EMA(grad)| (default) vs by |residual| {d:+.3f} (margin {m:.3f}) -> "
                     + {"above": "the default is better", "below": "the default is worse", "same": "no detectable difference"}[c])
    outcome = outcomes[0] if outcomes and len(set(outcomes)) == 1 else ("mixed" if outcomes else "no data")
    if outcome != "no data" and outcome != "mixed":
        outcome = f"sparsity {outcome}" if outcome != "no detectable effect" else outcome
    return Verdict("H1: enforcing sparsity (top-k + error feedback) helps reward", outcome, "; ".join(parts), nums)


def within_groups(x: list[float], y: list[float], groups: list) -> tuple[list[float], list[float], int]:
    """x and y minus their group means (groups with >= 3 points), and the number of groups used."""
    by: dict = {}
    for a, b, g in zip(x, y, groups):
        if not (math.isnan(a) or math.isnan(b)):
            by.setdefault(g, []).append((a, b))
    rx, ry, used = [], [], 0
    for pts in by.values():
        if len(pts) < 3:
            continue
        used += 1
        mx, my = _mean(p[0] for p in pts), _mean(p[1] for p in pts)
        rx += [p[0] - mx for p in pts]
        ry += [p[1] - my for p in pts]
    return rx, ry, used


def verdict_h2(records) -> Verdict:
    """H2: does update sparsity predict performance? Pearson r (Fisher-z 95% CI) between mean per-step
    sparsity and reward gain (last window - first window) over the RL runs of the 1A matrix: across
    all runs, and within a learning rate (each run minus its rate's mean), because the rate drives
    both sparsity and how far a run moves."""
    runs = [r for r in records if r["phase"] == "rl" and not r.get("variant")]
    nums, parts, across, within = {}, [], [], []
    for view in VIEWS:
        x, y = [r[f"sparsity/{view}"] for r in runs], [r["reward_gain"] for r in runs]
        r, lo, hi, n = pearson_ci(x, y)
        rx, ry, g = within_groups(x, y, [r_["lr"] for r_ in runs])
        rw, lw, hw, nw = pearson_ci(rx, ry, n_adjust=g)
        nums[view] = {"r": r, "ci95": [lo, hi], "n": n, "r_within_lr": rw, "ci95_within_lr": [lw, hw], "lr_groups": g}
        parts.append(f"{view}: across runs r = {r:+.2f} [{lo:+.2f}, {hi:+.2f}] (n={n}); within a learning rate "
                     f"r = {rw:+.2f} [{lw:+.2f}, {hw:+.2f}]")
        if lo == lo and (lo > 0 or hi < 0):
            across.append(("positively" if lo > 0 else "negatively", view))
        if lw == lw and (lw > 0 or hw < 0):
            within.append(("positively" if lw > 0 else "negatively", view))
    if within:
        outcome = "sparsity predicts reward gain within a learning rate: " + "; ".join(f"{d} ({v})" for d, v in within)
    elif across:
        outcome = "only across learning rates (" + "; ".join(f"{d}, {v}" for d, v in across) + "); not within a rate"
    else:
        outcome = "no evidence" if any(v["n"] >= 4 for v in nums.values()) else "no data"
    return Verdict("H2: update sparsity predicts performance", outcome, "; ".join(parts), nums)


def verdict_h3(records) -> Verdict:
    """H3: layer-specific budgets (norms dense, the rest sharing the remaining budget) vs one global
    budget and vs equal per-tensor budgets, at the same total density: final reward over seeds."""
    runs = select(records, "h3")
    g, t, k = (_final_rewards(runs, v) for v in ("global-1%", "per-tensor-1%", "per-kind-1%"))
    nums = {v: dict(zip(("mean", "sd", "n"), mean_sd(x))) for v, x in (("global", g), ("per-tensor", t), ("per-kind", k))}
    if not (g and k):
        return Verdict("H3: layer-specific thresholds beat one global threshold", "no data", "", nums)
    c1, d1, m1 = compare(k, g)
    c2, d2, m2 = compare(k, t)
    outcome = {"above": "per-kind budgets help", "below": "per-kind budgets hurt", "same": "no detectable effect"}[c1]
    text = (f"per-kind vs global: {d1:+.3f} (margin {m1:.3f}); per-kind vs per-tensor: {d2:+.3f} (margin {m2:.3f}); "
            "final reward, mean over seeds, margin = 1.96 standard errors")
    return Verdict("H3: layer-specific thresholds beat one global threshold", outcome, text, nums)


def published_comparison(v: Verdict) -> str:
    """Does this run's verdict agree with the published measurement cited for the claim (DESIGN.md)?"""
    if v.outcome in ("no data",):
        return "no data"
    if v.claim.startswith("98-99%"):  # PULSE: a bf16-view effect, fp32 master weights change almost everywhere
        return "consistent" if v.outcome.startswith("holds only in the bf16 view") else "inconsistent"
    if v.claim.startswith("attention < FFN"):  # Mukherjee et al.: roughly uniform across matrices
        spreads = {view: max(n[f"mean_{k}"] for k in KINDS_ORDER) - min(n[f"mean_{k}"] for k in KINDS_ORDER)
                   for view, n in v.numbers.items() if n["runs"]}
        uniform = all(x <= 0.05 for x in spreads.values())
        return (("consistent" if uniform else "inconsistent") + ": largest gap between layer kinds' mean sparsity "
                + ", ".join(f"{view} {x:.1%}" for view, x in spreads.items()) + " (uniform means <= 5 points)")
    if v.claim.startswith("RL updates are sparser"):  # Mukherjee et al.: at each one's usual learning rate
        return "consistent" if v.outcome == "holds" or v.outcome.endswith("at customary lrs: holds") else "inconsistent"
    return "not directly comparable"


CLAIMS = (verdict_sparse_per_step, verdict_layer_order, verdict_sparser_over_time, verdict_rl_sparser_than_sft)
HYPOTHESES = (verdict_h1, verdict_h2, verdict_h3)


def all_verdicts(records) -> list[Verdict]:
    return [f(records) for f in (*CLAIMS, *HYPOTHESES)]
