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

How verdicts are judged (issue 18): every claim about sparsity is computed per optimizer and task
kind (`strata`: AdamW/rl, SGD/rl, ..., AdamW/sft), never pooled across optimizers; each states its
n, its test and its 95% interval, all from scipy via sparsecomm/research/stats.py: an exact sign
test for "in what fraction of runs", a paired t (by seed) for reward differences, Pearson r with its
Fisher-z interval for H2. A stratum with fewer than stats.MIN_N runs (or pairs) is "inconclusive",
and RL vs SFT is judged only on pairs at the same learning rate.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from . import stats as S

DEFS = ("fp32_exact", "bf16_view", "rel_threshold", "abs_threshold")
VIEWS = ("fp32_exact", "bf16_view")  # the two the plan's claims are judged in
KINDS_ORDER = ("attention", "mlp", "norm")  # the plan: attention < FFN < LayerNorm (in sparsity)
HOLD = 0.98  # "98-99% of weights unchanged per step"
MAJORITY = 0.75  # a claim holds when it holds in at least this fraction of the comparisons (and a sign test agrees)
_NAN = float("nan")


@dataclass
class Verdict:
    claim: str
    outcome: str
    text: str
    numbers: dict = field(default_factory=dict)
    method: str = ""
    """How it was judged: the strata, the test, the rule for "inconclusive" (one line)."""


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


def load_tables(path: Path) -> list[dict]:
    """The run records saved in a report's tables.json (every summary except the per-step curves),
    so a committed report can be re-derived without its run directories."""
    data = json.loads(Path(path).read_text())
    return [{**r, "groups": tuple(r.get("groups") or ())} for r in data.get("runs", [])]


# ------------------------------------------------------------------------------ statistics

def mean_sd(xs) -> tuple[float, float, int]:
    return S.mean_sd(xs)


def _fmt_lr(lr) -> str:
    return f"{lr:g}"


OPTIMIZER_NAMES = {"adamw": "AdamW", "sgd": "SGD", "adafactor": "Adafactor", "aspg": "ASPG"}
PHASE_ORDER = ("rl", "sft", "pretrain")


def strata(records, precision: str = "fp32") -> list[tuple[str, list[dict]]]:
    """The runs split by optimizer and task kind (measured phase): [("AdamW/rl", runs), ...].
    Claims about sparsity are judged inside one stratum, never pooled across optimizers: AdamW,
    SGD, Adafactor and ASPG change weights by different rules, so a pooled fraction measures the
    matrix's mix of runs rather than any optimizer. Only `precision` runs (pure bf16 is its own
    factor: its two views coincide)."""
    keys = sorted({(r["optimizer"], r["phase"]) for r in records if r.get("precision") == precision},
                  key=lambda k: (list(OPTIMIZER_NAMES).index(k[0]) if k[0] in OPTIMIZER_NAMES else 99,
                                 PHASE_ORDER.index(k[1]) if k[1] in PHASE_ORDER else 99))
    return [(f"{OPTIMIZER_NAMES.get(o, o)}/{p}", [r for r in records if r.get("precision") == precision
                                                  and r["optimizer"] == o and r["phase"] == p]) for o, p in keys]


def view_outcome(by_view: dict) -> str:
    """From each view's outcome ("holds" | "does not hold" | "mixed" | "inconclusive" | "no data")
    to the claim's outcome in one stratum."""
    vals = set(by_view.values())
    if vals <= {"no data"}:
        return "no data"
    if "inconclusive" in vals or "no data" in vals:
        return "inconclusive"
    ok = {v: o == "holds" for v, o in by_view.items()}
    if all(ok.values()):
        return "holds"
    if ok.get("bf16_view") and not ok.get("fp32_exact"):
        return "holds only in the bf16 view"
    if ok.get("fp32_exact") and not ok.get("bf16_view"):
        return "holds only in fp32"
    if vals == {"does not hold"}:
        return "does not hold"
    return "mixed"


def _joined(outcomes: dict) -> str:
    """One outcome per stratum, in one line: 'AdamW/rl: holds; SGD/rl: inconclusive'."""
    return "; ".join(f"{k}: {o}" for k, o in outcomes.items()) if outcomes else "no data"


def _sign_cell(successes) -> tuple[str, dict, str]:
    st = S.sign_test(successes)
    o = st.outcome(MAJORITY)
    return o, {"n": st.n, "k": st.k, "frac": st.frac, "ci95": list(st.ci), "p_greater": st.p_greater,
               "p_less": st.p_less, "test": "exact sign test (binomial, p=1/2)", "outcome": o}, st.describe()


def _diff_numbers(d: S.Diff) -> dict:
    return {"test": d.test, "n": d.n, "mean_diff": d.diff, "ci95": list(d.ci), "p": d.p, d.effect_name: d.effect}


# ------------------------------------------------------------------------------ the plan's expected outcomes

def verdict_sparse_per_step(records) -> Verdict:
    """Plan: 98-99% of weights unchanged per step. Per optimizer and task kind (fp32 master
    weights), per view and learning rate: the fraction of runs whose mean per-step sparsity is
    >= 98%, by an exact sign test; a rate with fewer than MIN_N runs is inconclusive."""
    nums, outcomes, parts = {}, {}, []
    for label, runs in strata(records):
        lrs = sorted({r["lr"] for r in runs})
        cells, holds, lines = {}, {}, []
        for view in VIEWS:
            for lr in lrs:
                vals = [r[f"sparsity/{view}"] for r in runs if r["lr"] == lr]
                o, c, desc = _sign_cell(v >= HOLD for v in vals if v == v)
                cells[f"{view} lr={_fmt_lr(lr)}"] = {**c, "mean_sparsity": _mean(vals)}
                holds[(view, lr)] = o
                lines.append(f"{view} lr {_fmt_lr(lr)}: {desc}")
        sure = [lr for lr in lrs if all(holds[(v, lr)] not in ("inconclusive", "no data") for v in VIEWS)]
        fp32_lrs = [lr for lr in sure if holds[("fp32_exact", lr)] == "holds"]
        bf16_lrs = [lr for lr in sure if holds[("bf16_view", lr)] == "holds"]
        if not sure:
            outcome = f"inconclusive (fewer than {S.MIN_N} runs at every learning rate)"
        elif len(fp32_lrs) == len(sure):
            outcome = "holds"
        elif bf16_lrs and not fp32_lrs:
            outcome = "holds only in the bf16 view" + ("" if len(bf16_lrs) == len(sure) else
                                                       f" and only at lr <= {_fmt_lr(max(bf16_lrs))}")
        elif bf16_lrs or fp32_lrs:
            outcome = (f"holds only at some learning rates (fp32: {[_fmt_lr(x) for x in fp32_lrs]}; bf16 view: "
                       f"{[_fmt_lr(x) for x in bf16_lrs]})")
        else:
            outcome = "does not hold"
        if sure and len(sure) < len(lrs):
            outcome += f"; lr {', '.join(_fmt_lr(x) for x in lrs if x not in sure)}: inconclusive (n < {S.MIN_N})"
        outcomes[label] = outcome
        nums[label] = {"outcome": outcome, **cells}
        parts.append(f"{label}: " + "; ".join(lines))
    return Verdict("98-99% of weights unchanged per step", _joined(outcomes),
                   "per optimizer / task kind, fraction of runs with mean per-step sparsity >= 98%: " + " | ".join(parts), nums,
                   f"per optimizer / task kind, view and learning rate: fraction of runs >= 98% unchanged, exact sign test "
                   f"(holds: >= {MAJORITY:.0%} of runs and p < 0.05); fewer than {S.MIN_N} runs at a rate: inconclusive")


def _per_view_sign(claim: str, records, what: str, success, phase: str | None = None, pairs: dict | None = None) -> Verdict:
    """A per-run claim judged by a sign test in each stratum and view. `success(run, view)` -> bool
    or None (not measured); `pairs(run, view)` -> (x, y) adds a paired t of x - y."""
    nums, outcomes, parts = {}, {}, []
    for label, runs in strata(records):
        if phase and not label.endswith(f"/{phase}"):
            continue
        by_view, lines = {}, []
        nums[label] = {}
        for view in VIEWS:
            o, c, desc = _sign_cell(success(r, view) for r in runs)
            by_view[view] = o
            nums[label][view] = c
            if pairs is not None:
                xy = [pairs(r, view) for r in runs]
                d = S.paired([a for a, _ in xy], [b for _, b in xy])
                nums[label][view]["paired"] = _diff_numbers(d)
                desc += f"; mean difference {d.describe()}"
            lines.append(f"{view} {desc}")
        outcomes[label] = view_outcome(by_view)
        nums[label]["outcome"] = outcomes[label]
        parts.append(f"{label}: " + "; ".join(lines))
    return Verdict(claim, _joined(outcomes), f"{what}, per optimizer / task kind: " + " | ".join(parts), nums,
                   f"per optimizer / task kind and view: {what}, exact sign test (holds: >= {MAJORITY:.0%} of runs and "
                   f"p < 0.05){'; mean difference by paired t' if pairs else ''}; fewer than {S.MIN_N} runs: inconclusive")


def verdict_layer_order(records) -> Verdict:
    """Plan: attention < FFN < LayerNorm in sparsity. Per optimizer and task kind and per view,
    the fraction of fp32 runs (that recorded the three kinds) in the plan's order, by a sign test;
    the pairwise orders and the kinds' mean sparsity are kept in the numbers."""
    def ordered(r, view):
        if not all(f"kind/{view}/{k}" in r for k in KINDS_ORDER):
            return None
        a, m, n = (r[f"kind/{view}/{k}"] for k in KINDS_ORDER)
        return a < m < n

    v = _per_view_sign("attention < FFN < LayerNorm (sparsity by layer kind)", records,
                       "fraction of runs with sparsity(attention) < sparsity(mlp) < sparsity(norm)", ordered)
    for label, runs in strata(records):
        for view in VIEWS:
            have = [r for r in runs if all(f"kind/{view}/{k}" in r for k in KINDS_ORDER)]
            cell = v.numbers.get(label, {}).get(view)
            if cell is None:
                continue
            cell.update({f"mean_{k}": _mean(r[f"kind/{view}/{k}"] for r in have) for k in KINDS_ORDER})
            for lo, hi in (("attention", "mlp"), ("mlp", "norm")):
                st = S.sign_test(r[f"kind/{view}/{lo}"] < r[f"kind/{view}/{hi}"] for r in have)
                cell[f"frac_{lo}_lt_{hi}"] = {"k": st.k, "n": st.n, "frac": st.frac, "ci95": list(st.ci)}
    return v


def verdict_sparser_over_time(records) -> Verdict:
    """Plan: updates get sparser over training. Per optimizer and task kind and per view: the
    fraction of runs whose last-quarter sparsity exceeds their first-quarter sparsity (sign test),
    and the mean late - early difference (paired t)."""
    def late_gt_early(r, view):
        a, b = r.get(f"sparsity_late/{view}", _NAN), r.get(f"sparsity_early/{view}", _NAN)
        return None if a != a or b != b else a > b

    return _per_view_sign("updates get sparser over time", records,
                          "fraction of runs whose last-quarter sparsity exceeds their first-quarter sparsity", late_gt_early,
                          pairs=lambda r, view: (r.get(f"sparsity_late/{view}", _NAN), r.get(f"sparsity_early/{view}", _NAN)))



def _matched(runs, view: str, same_lr: bool) -> list[tuple[float, float, float, float]]:
    """(rl, sft, rl_lr, sft_lr) sparsity of matched runs: same model, optimizer, seed, reward and
    precision, and (same_lr) the same learning rate; plain matrix runs only (no H1/H3 variant)."""
    rl = [r for r in runs if r["phase"] == "rl" and not r.get("variant")]
    sft = [r for r in runs if r["phase"] == "sft" and not r.get("variant")]
    out = []
    for r in rl:
        for s in sft:
            if all(s.get(k) == r.get(k) for k in ("model", "optimizer", "seed", "reward", "precision")) and \
                    (not same_lr or s["lr"] == r["lr"]):
                out.append((r[f"sparsity/{view}"], s[f"sparsity/{view}"], r["lr"], s["lr"]))
    return out


def verdict_rl_sparser_than_sft(records) -> Verdict:
    """Plan: RL updates are sparser than SFT updates. Judged only on matched (rl, sft) pairs at the
    same learning rate (same model, optimizer, seed), per optimizer, with a sign test and a paired
    t of the difference; fewer than MIN_N pairs -> inconclusive. The customary-rate comparison (RL's
    3e-4 against SFT's 1e-3) is reported beside it but never decides: there a difference can come
    from the rate alone."""
    nums, outcomes, parts = {}, {}, []
    for opt in sorted({r["optimizer"] for r in records}):
        runs = [r for r in records if r["optimizer"] == opt and r.get("precision") == "fp32"]
        if not any(r["phase"] == "sft" for r in runs):
            continue
        label = OPTIMIZER_NAMES.get(opt, opt)
        by_view, lines, nums[label] = {}, [], {}
        for view in VIEWS:
            pairs = _matched(runs, view, same_lr=True)
            o, c, desc = _sign_cell(a > b for a, b, _, _ in pairs)
            d = S.paired([a for a, *_ in pairs], [b for _, b, *_ in pairs])
            by_view[view] = o
            lrs = sorted({lr for *_, lr, _ in pairs})
            nums[label][f"matched lr, {view}"] = {**c, "paired_rl_minus_sft": _diff_numbers(d), "lrs": lrs,
                                                  "pairs_per_lr": {_fmt_lr(x): sum(p[2] == x for p in pairs) for x in lrs}}
            lines.append(f"{view} RL sparser in {desc}; RL - SFT {d.describe()}")
            cust = [p for p in _matched(runs, view, same_lr=False) if p[2] != p[3]
                    and p[2] == _customary("rl") and p[3] == _customary("sft")]
            if cust:
                nums[label][f"customary lr (not a test), {view}"] = {
                    "pairs": len(cust), "frac_rl_sparser": sum(a > b for a, b, *_ in cust) / len(cust),
                    "rl_lr": cust[0][2], "sft_lr": cust[0][3]}
        outcomes[label] = view_outcome(by_view)
        nums[label]["outcome"] = outcomes[label]
        cust_note = next((f"; at customary rates (RL {_fmt_lr(c['rl_lr'])}, SFT {_fmt_lr(c['sft_lr'])}) RL is sparser in "
                          f"{c['frac_rl_sparser']:.0%} of {c['pairs']} pairs: not a test, the rates differ"
                          for k, c in nums[label].items() if k.startswith("customary") and k.endswith("bf16_view")), "")
        parts.append(f"{label}, matched learning rates: " + "; ".join(lines) + cust_note)
    return Verdict("RL updates are sparser than SFT updates", _joined(outcomes), " | ".join(parts), nums,
                   f"per optimizer, (RL, SFT) pairs at the same learning rate, model and seed: exact sign test of 'RL sparser' "
                   f"and paired t of the difference; fewer than {S.MIN_N} pairs: inconclusive; customary rates never decide")


def _customary(phase: str) -> float:
    from .matrix import CUSTOMARY_LR

    return CUSTOMARY_LR[phase]


# ------------------------------------------------------------------------------ hypotheses

# Fixed facts of the matrix's setup that bear on the reward comparisons (sparsecomm/rl/build.py):
# dense AdamW is torch.optim.AdamW with its default weight decay 0.01; ASPG's default is 0.
H1_CAVEAT = "caveat: dense AdamW ran with torch's default weight decay 0.01, ASPG with 0"


def _by_seed(runs, variant: str) -> dict:
    return {r["seed"]: r["reward_last"] for r in runs if r.get("variant") == variant}


def _paired_by_seed(runs, a: str, b: str) -> S.Diff:
    """Paired t of final reward, variant a minus variant b, over the seeds both ran (same init,
    data and prompts per seed)."""
    ra, rb = _by_seed(runs, a), _by_seed(runs, b)
    seeds = sorted(set(ra) & set(rb))
    return S.paired([ra[s] for s in seeds], [rb[s] for s in seeds])


EFFECT = {"above": "helps", "below": "hurts", "same": "no detectable effect", "inconclusive": "inconclusive"}


def verdict_h1(records) -> Verdict:
    """H1: does enforcing sparsity help or hurt? ASPG top-k vs dense vs random-k at equal density
    and equal steps: final reward (mean of the last window), paired by seed (paired t, 95% CI,
    d_z); fewer than MIN_N common seeds -> inconclusive."""
    runs = select(records, "h1")
    nums = {v: dict(zip(("mean", "sd", "n"), mean_sd(_by_seed(runs, v).values())))
            for v in sorted({r["variant"] for r in runs})}
    parts, outcomes = [], []
    for tag in sorted({r["variant"].split("-", 1)[1] for r in runs if r["variant"].startswith("aspg-")}):
        vs_dense = _paired_by_seed(runs, f"aspg-{tag}", "dense")
        vs_rand = _paired_by_seed(runs, f"aspg-{tag}", f"randomk-{tag}")
        nums[f"aspg-{tag} - dense"], nums[f"aspg-{tag} - randomk-{tag}"] = _diff_numbers(vs_dense), _diff_numbers(vs_rand)
        effect = EFFECT[vs_dense.direction()]
        outcomes.append(effect)
        rank = {"above": "beats", "below": "loses to", "same": "ties",
                "inconclusive": "inconclusive against"}[vs_rand.direction()]
        parts.append(f"at {tag}: ASPG - dense {vs_dense.describe()} -> {effect}; ASPG - random-k {vs_rand.describe()} -> "
                     f"importance ranking {rank} random")
    if _by_seed(runs, "magnitude-1%") and _by_seed(runs, "aspg-1%"):  # the importance rule itself: |e x EMA(g)| vs |e|
        d = _paired_by_seed(runs, "aspg-1%", "magnitude-1%")
        nums["aspg-1% - magnitude-1%"] = _diff_numbers(d)
        parts.append("at 1%: ranking by |residual x EMA(grad)| (default) - by |residual| " + d.describe() + " -> "
                     + {"above": "the default is better", "below": "the default is worse", "same": "no detectable difference",
                        "inconclusive": "inconclusive"}[d.direction()])
    if not outcomes:
        return Verdict("H1: enforcing sparsity (top-k + error feedback) helps reward", "no data", "", nums)
    outcome = outcomes[0] if len(set(outcomes)) == 1 else "mixed"
    if outcome in ("helps", "hurts"):
        outcome = f"sparsity {outcome}"
    parts.append(H1_CAVEAT)
    return Verdict("H1: enforcing sparsity (top-k + error feedback) helps reward", outcome, "; ".join(parts), nums,
                   f"final reward paired by seed, paired t 95% CI of the difference, effect size d_z; fewer than {S.MIN_N} "
                   "common seeds: inconclusive")


def verdict_h2(records) -> Verdict:
    """H2: does update sparsity predict performance? Per optimizer (fp32 RL runs of the 1A matrix):
    Pearson r (scipy, Fisher-z 95% CI) between mean per-step sparsity and reward gain (last window -
    first window), across all runs and within a learning rate (each run minus its rate's mean),
    because the rate drives both sparsity and how far a run moves."""
    nums, outcomes, parts = {}, {}, []
    for label, runs in strata(records):
        if not label.endswith("/rl"):
            continue
        # plain matrix runs with the default reward: reward gains under other reward functions are not on one scale
        runs = [r for r in runs if not r.get("variant") and r.get("reward", "default") == "default"]
        nums[label], within, across, lines = {}, [], [], []
        for view in VIEWS:
            x, y = [r[f"sparsity/{view}"] for r in runs], [r["reward_gain"] for r in runs]
            c = S.pearson(x, y)
            w, g = S.pearson_within(x, y, [r["lr"] for r in runs])
            nums[label][view] = {"r": c.r, "ci95": list(c.ci), "n": c.n, "p": c.p, "test": c.test,
                                 "r_within_lr": w.r, "ci95_within_lr": list(w.ci), "n_within_lr": w.n, "p_within_lr": w.p,
                                 "lr_groups": g}
            lines.append(f"{view}: across runs {c.describe()}; within a learning rate {w.describe()}")
            if w.direction() in ("positive", "negative"):
                within.append(("positively" if w.direction() == "positive" else "negatively", view))
            if c.direction() in ("positive", "negative"):
                across.append(("positively" if c.direction() == "positive" else "negatively", view))
        if within:
            o = "predicts reward gain within a learning rate: " + ", ".join(f"{d} ({v})" for d, v in within)
        elif across:
            o = "only across learning rates (" + ", ".join(f"{d}, {v}" for d, v in across) + "); not within a rate"
        elif any(nums[label][v]["n"] >= S.MIN_N for v in VIEWS):
            o = "no evidence"
        else:
            o = "inconclusive" if runs else "no data"
        outcomes[label] = o
        nums[label]["outcome"] = o
        parts.append(f"{label}: " + "; ".join(lines))
    return Verdict("H2: update sparsity predicts performance", _joined(outcomes), " | ".join(parts), nums,
                   "per optimizer (fp32 RL runs, default reward): Pearson r with its Fisher-z 95% CI (scipy), across runs and "
                   f"within a learning rate; fewer than {S.MIN_N} runs: inconclusive")


def verdict_h3(records) -> Verdict:
    """H3: layer-specific budgets (norms dense, the rest sharing the remaining budget) vs one global
    budget and vs equal per-tensor budgets, at the same total density: final reward paired by seed."""
    runs = select(records, "h3")
    names = (("global", "global-1%"), ("per-tensor", "per-tensor-1%"), ("per-kind", "per-kind-1%"))
    nums = {v: dict(zip(("mean", "sd", "n"), mean_sd(_by_seed(runs, tag).values()))) for v, tag in names}
    if not (_by_seed(runs, "global-1%") and _by_seed(runs, "per-kind-1%")):
        return Verdict("H3: layer-specific thresholds beat one global threshold", "no data", "", nums)
    d1 = _paired_by_seed(runs, "per-kind-1%", "global-1%")
    d2 = _paired_by_seed(runs, "per-kind-1%", "per-tensor-1%")
    nums["per-kind - global"], nums["per-kind - per-tensor"] = _diff_numbers(d1), _diff_numbers(d2)
    outcome = {"above": "per-kind budgets help", "below": "per-kind budgets hurt", "same": "no detectable effect",
               "inconclusive": "inconclusive"}[d1.direction()]
    text = f"final reward, per-kind - global: {d1.describe()}; per-kind - per-tensor: {d2.describe()}"
    return Verdict("H3: layer-specific thresholds beat one global threshold", outcome, text, nums,
                   f"final reward paired by seed, paired t 95% CI of the difference, effect size d_z; fewer than {S.MIN_N} "
                   "common seeds: inconclusive")


REFERENCE_STRATUM = "AdamW/rl"  # the published measurements are of Adam-family RL fine-tuning


def published_comparison(v: Verdict) -> str:
    """Does this run's verdict agree with the published measurement cited for the claim (DESIGN.md)?
    Judged on the AdamW stratum (the published runs use Adam-family optimizers)."""
    if v.outcome in ("no data",):
        return "no data"
    if v.claim.startswith("98-99%"):  # PULSE: a bf16-view effect, fp32 master weights change almost everywhere
        o = v.numbers.get(REFERENCE_STRATUM, {}).get("outcome", "no data")
        if o.startswith("inconclusive") or o == "no data":
            return f"{o} ({REFERENCE_STRATUM})"
        return ("consistent" if o.startswith("holds only in the bf16 view") else "inconsistent") + f" ({REFERENCE_STRATUM})"
    if v.claim.startswith("attention < FFN"):  # Mukherjee et al.: roughly uniform across matrices
        cells = v.numbers.get(REFERENCE_STRATUM, {})
        spreads = {view: max(c[f"mean_{k}"] for k in KINDS_ORDER) - min(c[f"mean_{k}"] for k in KINDS_ORDER)
                   for view, c in cells.items() if isinstance(c, dict) and c.get("n")}
        if not spreads:
            return "no data"
        uniform = all(x <= 0.05 for x in spreads.values())
        return (("consistent" if uniform else "inconsistent") + f" ({REFERENCE_STRATUM}): largest gap between layer kinds' "
                "mean sparsity " + ", ".join(f"{view} {x:.1%}" for view, x in spreads.items()) + " (uniform means <= 5 points)")
    if v.claim.startswith("RL updates are sparser"):  # Mukherjee et al.: at each one's usual learning rate
        o = v.numbers.get("AdamW", {}).get("outcome", "no data")
        if o in ("inconclusive", "no data"):
            return o
        where = " (AdamW, at matched learning rates; the published comparison is at each one's usual rate)"
        if o == "holds only in the bf16 view":
            return "partly consistent: RL is sparser in the bf16 view, not in fp32 master weights" + where
        return ("consistent" if o == "holds" else "inconsistent") + where
    return "not directly comparable"


CLAIMS = (verdict_sparse_per_step, verdict_layer_order, verdict_sparser_over_time, verdict_rl_sparser_than_sft)
HYPOTHESES = (verdict_h1, verdict_h2, verdict_h3)


def all_verdicts(records) -> list[Verdict]:
    return [f(records) for f in (*CLAIMS, *HYPOTHESES)]
