"""Held-out non-inferiority on a harder task (issue 18): calibration, per-method LR tuning, the
pre-registered evaluation, and the bytes frontier of value x index codecs.

The job: 2 workers under torchrun (gloo), tiny GPT-2, a task harder than the demo's 1-digit
addition (chosen by `calibrate`), a dense AdamW SFT warm start, then GRPO with the method's
communication. Evaluation: greedy exact match on `eval_size` distinct held-out prompts, drawn from
a fixed hash-defined part of the prompt space that no training split contains (TrainConfig
heldout_fraction; asserted at start of every run). Weight decay: 0.01 decoupled for every method
(AdamW's default; ASPG gets aspg.weight_decay=0.01).

Stages (each writes benchmarks/results/heldout_<stage>.{md,json}; the plan is
benchmarks/results/heldout_plan.md, written before `tune` and `evaluate` were run):

    python benchmarks/bench_heldout.py frontier              # bytes per entry, every value codec x raw/rice (~10 s)
    python benchmarks/bench_heldout.py calibrate             # dense at candidate difficulties, seeds 50-51
    python benchmarks/bench_heldout.py tune                  # LR grid per method, tuning seeds 100-101
    python benchmarks/bench_heldout.py evaluate              # every method at its tuned LR, seeds 300-309
    python benchmarks/bench_heldout.py evaluate --pilot --seeds 300-301 --methods dense,aspg-1%
                                                             # a labelled pilot: decides nothing
    python benchmarks/bench_heldout.py evaluate --render     # rewrite heldout.md / .png from heldout.json

`evaluate` reports per method: held-out accuracy (mean, sd, per seed), the paired difference to
dense with its 95% paired t interval (scipy.stats.ttest_rel), the one-sided test against the plan's
margin (scipy.stats.ttest_1samp of the paired differences), Cohen's d_z, and bytes per worker
against an fp32 and a bf16 dense ring all-reduce; and a plot of held-out accuracy against bytes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, run_demo_job, table, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WD = "aspg.weight_decay=0.01"  # = torch AdamW's default: one decay policy for every method
_ASPG = ["comm=aspg", "optimizer=aspg", WD]
METHODS = {
    "dense": ["comm=ddp", "optimizer=adamw"],
    "aspg-1%": [*_ASPG, "density=0.01"],
    "aspg-0.1%": [*_ASPG, "density=0.001"],
    "randomk-1%": [*_ASPG, "density=0.01", "aspg.importance=random"],
    "powersgd": ["comm=powersgd", "optimizer=adamw"],
    "lora-r8": ["comm=ddp", "optimizer=adamw", "lora_rank=8"],
    # the bytes frontier: lower value bits at the two densities (tuned LR of the same density's bf16 run)
    "aspg-1%-int4": [*_ASPG, "density=0.01", "value_codec=int4"],
    "aspg-1%-int2": [*_ASPG, "density=0.01", "value_codec=int2"],
    "aspg-0.3%-int4": [*_ASPG, "density=0.003", "value_codec=int4"],
    "aspg-0.1%-int4": [*_ASPG, "density=0.001", "value_codec=int4"],
    "aspg-0.1%-int2": [*_ASPG, "density=0.001", "value_codec=int2"],
}
TUNED = ("dense", "aspg-1%", "aspg-0.1%", "randomk-1%", "powersgd", "lora-r8")  # the grid runs these
LR_FROM = {"aspg-1%-int4": "aspg-1%", "aspg-1%-int2": "aspg-1%", "aspg-0.3%-int4": "aspg-1%",
           "aspg-0.1%-int4": "aspg-0.1%", "aspg-0.1%-int2": "aspg-0.1%"}
LR_GRID = {m: [1.5e-4, 3e-4, 1e-3] for m in TUNED} | {"lora-r8": [3e-4, 1e-3, 3e-3]}
SEEDS = {"calibrate": [50, 51], "tune": [100, 101], "evaluate": list(range(300, 310))}
# candidate difficulties for `calibrate`: (label, overrides)
CANDIDATES = {
    "add2-sft150": ["task=addition", "task_kwargs={digits: 2}", "sft_steps=150"],
    "add2-sft800": ["task=addition", "task_kwargs={digits: 2}", "sft_steps=800"],
    "sort4-sft150": ["task=sort", "task_kwargs={length: 4}", "sft_steps=150", "grpo.max_new_tokens=5"],
    "sort5-sft150": ["task=sort", "task_kwargs={length: 5}", "sft_steps=150", "grpo.max_new_tokens=6"],
    "sort7-sft150": ["task=sort", "task_kwargs={length: 7}", "sft_steps=150", "grpo.max_new_tokens=8"],
    "sort8-sft100": ["task=sort", "task_kwargs={length: 8}", "sft_steps=100", "grpo.max_new_tokens=9"],
}
# the common job; the task is fixed in the plan after calibration (CHOSEN)
JOB = ["heldout_fraction=0.2", "eval_size=500", "grpo.max_new_tokens=4", "rl_steps=300", "whole_run_rank=true"]
CHOSEN = "sort8-sft100"  # set from heldout_calibration.md before the plan was written (see heldout_plan.md)


def run(name: str, seed: int, overrides: list[str], out: Path) -> dict:
    """One 2-worker job; returns its held-out accuracy, reward, bytes and CPU seconds."""
    j = run_demo_job(out, seed, overrides, port=29700 + seed % 200, what=f"{name} seed {seed}")
    rows, s, sent = j["rows"], j["summary"], j["sent_bytes"]
    w = s.get("whole_run_rank", {})
    return {"method": name, "seed": seed, "heldout_accuracy": s["eval_accuracy_after_rl"],
            "heldout_accuracy_before": s["eval_accuracy_before_rl"],
            "final_reward": statistics.mean(m["train/reward"] for m in rows[-50:]),
            "sent_bytes": sent, "dense_fp32_bytes": s["dense_equiv_bytes_total"],
            "batch_tokens_mean": s.get("batch_tokens_mean"),
            "whole_run": {k.removeprefix("rank/whole_run/"): v for k, v in w.items() if k.count("/") == 2 or "mean_" in k
                          or k.endswith("/global")},
            "wall_s": j["wall_s"], "cpu_s": j["cpu_s"]}


def _runs(names: list[str], seeds: list[int], overrides_of) -> list[dict]:
    tmp, out = Path(tempfile.mkdtemp()), []
    for name in names:
        for seed in seeds:
            r = run(name, seed, overrides_of(name), tmp / f"{name}-{seed}")
            out.append(r)
            print(f"{name:18s} seed {seed}: held-out {r['heldout_accuracy_before']:.3f} -> {r['heldout_accuracy']:.3f}, "
                  f"reward {r['final_reward']:.3f}, sent {r['sent_bytes']:,} B, {r['cpu_s']:.0f} CPU s", flush=True)
    return out


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


# ----------------------------------------------------------------------------------- stages
def calibrate(a) -> int:
    labels = a.methods.split(",") if a.methods else list(CANDIDATES)
    seeds = parse_seeds(a.seeds) if a.seeds else SEEDS["calibrate"]
    rows = []
    for label in labels:
        rs = _runs(["dense"], seeds, lambda m, label=label: [*METHODS[m], *JOB, *CANDIDATES[label]])
        acc = [r["heldout_accuracy"] for r in rs]
        m, sd = _mean_sd(acc)
        rows.append({"candidate": label, "overrides": CANDIDATES[label], "seeds": seeds, "heldout_accuracy": acc,
                     "mean": m, "sd": sd, "before": [r["heldout_accuracy_before"] for r in rs],
                     "final_reward": [r["final_reward"] for r in rs], "cpu_s": [r["cpu_s"] for r in rs],
                     "in_range": 0.3 <= m <= 0.8})
    md = ("Dense AdamW (DDP, 2 workers) at each candidate difficulty; common job overrides: `" + " ".join(JOB) + "`. "
          "Target: held-out greedy exact-match accuracy after RL between 0.3 and 0.8.\n\n"
          + table(["candidate", "held-out acc. after RL (per seed)", "mean +- sd", "before RL", "final sampled reward",
                   "CPU s per run", "in [0.3, 0.8]"],
                  [[r["candidate"], ", ".join(f"{x:.3f}" for x in r["heldout_accuracy"]), f"{r['mean']:.3f} +- {r['sd']:.3f}",
                    ", ".join(f"{x:.3f}" for x in r["before"]), ", ".join(f"{x:.3f}" for x in r["final_reward"]),
                    f"{statistics.mean(r['cpu_s']):.0f}", "PASS" if r["in_range"] else "FAIL"] for r in rows]))
    print(md)
    print("wrote", write_results(a.name or "heldout_calibration", {"rows": rows, "job": JOB}, md))
    return 0


def tune(a) -> int:
    methods = a.methods.split(",") if a.methods else list(TUNED)
    seeds = parse_seeds(a.seeds) if a.seeds else SEEDS["tune"]
    if set(seeds) & set(SEEDS["evaluate"]):
        raise SystemExit(f"tuning seeds {seeds} overlap the evaluation seeds {SEEDS['evaluate']}")
    path = RESULTS / f"{a.name or 'heldout_tuning'}.json"
    # run in chunks (--methods a,b): earlier methods' runs are kept, a method named again is rerun
    runs = [r for r in json.loads(path.read_text())["runs"] if r["method"] not in methods] if path.exists() else []
    for m in methods:
        for lr in LR_GRID[m]:
            for r in _runs([m], seeds, lambda m, lr=lr: [*METHODS[m], *JOB, *CANDIDATES[CHOSEN], f"rl_lr={lr}"]):
                runs.append({**r, "rl_lr": lr})
    best, rows = {}, []
    methods = [m for m in TUNED if any(r["method"] == m for r in runs)]
    for m in methods:
        by_lr = {lr: [r["heldout_accuracy"] for r in runs if r["method"] == m and r["rl_lr"] == lr] for lr in LR_GRID[m]}
        best[m] = max(by_lr, key=lambda lr: (statistics.mean(by_lr[lr]), -lr))  # ties: the smaller rate
        rows += [[m, f"{lr:g}", ", ".join(f"{x:.3f}" for x in v), f"{statistics.mean(v):.3f}", "**best**" if lr == best[m] else ""]
                 for lr, v in by_lr.items()]
    missing = [m for m in TUNED if m not in methods]
    md = (f"LR grid per method on tuning seeds {seeds} (never used for evaluation), task `{CHOSEN}`; selection rule "
          "(heldout_plan.md): the rate with the highest mean held-out accuracy, ties to the smaller rate. Run in "
          "chunks of methods (`--methods`), one locked command each."
          + (f" **Not yet tuned: {', '.join(missing)}** (`python benchmarks/bench_heldout.py tune --methods "
             f"{','.join(missing)}`).\n\n" if missing else "\n\n")
          + table(["method", "rl_lr", "held-out acc. per seed", "mean", ""], rows))
    print(md)
    print("wrote", write_results(a.name or "heldout_tuning", {"runs": runs, "best_lr": best, "seeds": seeds,
                                                              "task": CHOSEN}, md))
    return 0


def tuned_lr(method: str) -> float:
    best = json.loads((RESULTS / "heldout_tuning.json").read_text())["best_lr"]
    return best[LR_FROM.get(method, method)]


def evaluate(a) -> int:
    name = a.name or ("heldout_pilot" if a.pilot else "heldout")
    if a.render:
        data = json.loads((RESULTS / f"{name}.json").read_text())
        data["rows"] = summarize(data)  # the statistics again, from the runs
        (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
        md = render(data)
        head = (RESULTS / f"{name}.md").read_text().split("\n\n", 2)
        (RESULTS / f"{name}.md").write_text("\n\n".join(head[:2]) + "\n\n" + md)
        plot(data, RESULTS / f"{name}.png")
        return 0
    plan = _plan()
    methods = a.methods.split(",") if a.methods else list(METHODS)
    seeds = parse_seeds(a.seeds) if a.seeds else plan["seeds"]
    path = RESULTS / f"{name}.json"
    # run in chunks of methods (like `tune`): the pre-registered file keeps earlier chunks' methods, with the
    # commit each chunk ran at; a method named again is rerun
    old = json.loads(path.read_text()) if path.exists() and not a.pilot else None
    kept = [m for m in old["methods"] if m not in methods] if old else []
    if not a.pilot and (seeds != plan["seeds"] or "dense" not in methods + kept):
        raise SystemExit(f"the pre-registered evaluation runs seeds {plan['seeds']} with dense; anything else is --pilot")
    # the commit the runs start from (each run imports the working tree; keep it unchanged while this runs)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    runs = _runs(methods, seeds, lambda m: [*METHODS[m], *JOB, *CANDIDATES[CHOSEN], f"rl_lr={tuned_lr(m)}"])
    commits = {m: (old.get("commits") or {}).get(m, old.get("commit")) for m in kept} if old else {}
    order = [m for m in METHODS if m in kept or m in methods]
    data = {"runs": [r for r in old["runs"] if r["method"] in kept] + runs if old else runs, "seeds": seeds,
            "methods": order, "margin": plan["margin"], "pilot": bool(a.pilot), "task": CHOSEN, "job": JOB,
            "lr": {m: tuned_lr(m) for m in order}, "commits": {**commits, **{m: commit for m in methods}},
            "deviations": [*(old["deviations"] if old else []), *a.deviation],
            "not_run": [m for m in METHODS if m not in order]}
    data["rows"] = summarize(data)
    md = render(data)
    print(md)
    print("wrote", write_results(name, data, md))
    plot(data, RESULTS / f"{name}.png")
    return 0


def _plan() -> dict:
    """Seeds and margin, read back from the pre-registered plan's machine-readable line."""
    for line in (RESULTS / "heldout_plan.md").read_text().splitlines():
        if line.startswith("PLAN: "):
            return json.loads(line[len("PLAN: "):])
    raise SystemExit("heldout_plan.md has no 'PLAN: {...}' line")


def summarize(data: dict) -> list[dict]:
    from sparsecomm.research import stats as S

    runs, margin = data["runs"], data["margin"]
    acc = {m: {r["seed"]: r["heldout_accuracy"] for r in runs if r["method"] == m} for m in data["methods"]}
    seeds = data["seeds"]
    ref = [acc["dense"].get(s, float("nan")) for s in seeds]
    rows = []
    # every method against dense's ring all-reduce of the whole model (a run's own dense_fp32_bytes counts only
    # its trainable parameters: LoRA's adapters would compare with themselves)
    fp32 = statistics.mean(r["dense_fp32_bytes"] for r in runs if r["method"] == "dense")
    for m in data["methods"]:
        rs = [r for r in runs if r["method"] == m]
        xs = [acc[m].get(s, float("nan")) for s in seeds]
        sent = statistics.mean(r["sent_bytes"] for r in rs)
        row = {"method": m, "n": len(rs), "heldout_mean": statistics.mean(r["heldout_accuracy"] for r in rs),
               "heldout_sd": statistics.stdev([r["heldout_accuracy"] for r in rs]) if len(rs) > 1 else 0.0,
               "heldout_per_seed": xs, "reward_mean": statistics.mean(r["final_reward"] for r in rs),
               "sent_bytes": sent, "x_vs_fp32_dense": fp32 / sent if sent else float("inf"),
               "x_vs_bf16_dense": fp32 / 2 / sent if sent else float("inf"), "lr": data["lr"].get(m)}
        if m != "dense":
            p = S.paired(xs, ref)
            ni = S.non_inferiority(xs, ref, abs(margin))
            row.update(diff=p.diff, ci95=list(p.ci), p_two_sided=p.p, cohens_dz=p.effect, lower_one_sided=ni.lower,
                       p_one_sided=ni.p, verdict="pilot: decides nothing" if data["pilot"] else ni.outcome)
        rows.append(row)
    return rows


def _times(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"  # dense vs bf16 dense is 0.5x, not "0"


def render(data: dict) -> str:
    rows, margin = data["rows"], data["margin"]
    head = ("**PILOT: decides nothing** (fewer seeds or methods than the plan; not evidence for or against any "
            "method).\n\n" if data["pilot"] else "")
    job = " ".join(data["job"] + CANDIDATES.get(data["task"], []))  # the task's overrides come last and win
    md = [head, f"Task `{data['task']}` (`{job}`), 2 workers, seeds {data['seeds']}; outcome: "
          "greedy exact-match accuracy on 500 distinct held-out prompts after RL. Difference = method - dense paired by "
          f"seed; margin {margin:+g} (fixed in heldout_plan.md before the run). Bytes: what each worker sent in the RL "
          "phase (encoded buffers; DDP: ring all-reduce volume; PowerSGD: formula) vs dense's ring all-reduce of the "
          "whole model in fp32 and in bf16 (LoRA sends only its adapters).\n\n",
          table(["method", "LR", "held-out acc. (mean +- sd)", "method - dense [95% paired t CI]", "one-sided lower 95%",
                 "p (one-sided vs margin)", "d_z", "verdict", "bytes/worker", "x vs fp32 dense", "x vs bf16 dense"],
                [[r["method"], f"{r['lr']:g}" if r.get("lr") else "", f"{r['heldout_mean']:.3f} +- {r['heldout_sd']:.3f}",
                  f"{r['diff']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]" if "diff" in r else "reference",
                  f"{r['lower_one_sided']:+.3f}" if "diff" in r else "", f"{r['p_one_sided']:.3g}" if "diff" in r else "",
                  f"{r['cohens_dz']:+.2f}" if "diff" in r else "", r.get("verdict", ""), f"{r['sent_bytes']:,.0f}",
                  _times(r["x_vs_fp32_dense"]), _times(r["x_vs_bf16_dense"])] for r in rows])]
    ok = [r for r in rows if r.get("verdict") == "non-inferior"]
    if not data["pilot"]:
        best = max(ok, key=lambda r: r["x_vs_fp32_dense"], default=None)
        md.append("\n## targets\n\n" + table(["target", "measured", "result"], [[
            "largest byte reduction non-inferior to dense >= 300x (vs fp32 ring all-reduce)",
            f"{best['method']}: {best['x_vs_fp32_dense']:.0f}x" if best else "no method shown non-inferior",
            "PASS" if best and best["x_vs_fp32_dense"] >= 300 else "FAIL"]]))
    if data.get("not_run") or data.get("deviations"):
        md.append("\n## deviations from the plan\n\n" + "".join(f"- {d}\n" for d in data.get("deviations", []))
                  + (f"- Not evaluated yet: {', '.join(data['not_run'])} (each method is its own test, so the "
                     "verdicts above stand alone; the rest of the plan is still open).\n" if data.get("not_run") else ""))
    commits = data.get("commits") or ({m: data["commit"] for m in data["methods"]} if data.get("commit") else {})
    if commits:
        by = {}
        for m, c in commits.items():
            by.setdefault(c, []).append(m)
        md.append("\nCode: " + "; ".join(f"commit {c} ({', '.join(ms)})" for c, ms in by.items()) + ".\n")
    md.append(f"\n![held-out accuracy vs bytes]({'heldout_pilot' if data['pilot'] else 'heldout'}.png)\n")
    return "".join(md)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common import save_figure

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in data["rows"]:
        line = ax.errorbar(max(r["sent_bytes"], 1), r["heldout_mean"], yerr=r["heldout_sd"], fmt="o", capsize=3)[0]
        ax.annotate(r["method"], (max(r["sent_bytes"], 1), r["heldout_mean"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points", color=line.get_color())  # the label in its point's colour
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent per worker in the RL phase (log)")
    ax.set_ylabel("held-out exact-match accuracy (mean +- sd over seeds)")
    ax.set_title(("PILOT (decides nothing): " if data["pilot"] else "") + f"task {data['task']}, seeds {data['seeds']}",
                 fontsize=9)
    save_figure(fig, path)


def frontier(a) -> int:
    """Bytes per sent entry of every value codec with raw and Rice indices, measured from encode()
    on a delta of the tiny model's size at 1%, 0.3% and 0.1%; and the reduction against a ring
    all-reduce of the same N in fp32 and bf16 at P=2 (one worker's send, headers included)."""
    import torch

    from sparsecomm.codec import VALUE_CODECS, encode
    from sparsecomm.delta import SparseDelta
    from sparsecomm.track.comm import ring_allreduce_bytes

    from sparsecomm.rl.models import build_model, char_tokenizer

    model, _ = build_model("tiny", char_tokenizer(), seed=0)
    n = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    rows, out = [], []
    for density in (0.01, 0.003, 0.001):
        k = max(1, round(density * n))
        idx = torch.randperm(n, generator=g)[:k].sort().values
        vals = torch.randn(k, generator=g) * 1e-4
        for vc in VALUE_CODECS:
            for ic in ("raw", "rice"):
                size = len(encode(SparseDelta(idx, vals, (n,)), ic, vc))
                fp32 = ring_allreduce_bytes(n, 4, 2)
                rec = {"density": density, "value_codec": vc, "index_codec": ic, "n": n, "k": k, "message_bytes": size,
                       "bytes_per_entry": size / k, "x_vs_fp32_ring_P2": fp32 / size, "x_vs_bf16_ring_P2": fp32 / 2 / size}
                out.append(rec)
                rows.append([f"{density:.1%}", vc, ic, f"{size:,}", f"{size / k:.3f}", f"{fp32 / size:.0f}", f"{fp32 / 2 / size:.0f}"])
    md = (f"One worker's encoded message (headers included) for a delta of the tiny model's N = {n:,} parameters, "
          "random positions, k = density x N; reduction against one worker's share of a ring all-reduce of N at P=2 "
          "(2 (P-1)/P x N x 4 or 2 bytes). Reduction is per exchange; a run also has dense warm-up steps and the "
          "exchange's own path choice (see heldout.md for measured run totals).\n\n"
          + table(["density", "values", "indices", "message bytes", "bytes / entry", "x vs fp32 ring", "x vs bf16 ring"], rows))
    print(md)
    print("wrote", write_results("heldout_frontier", {"rows": out}, md))
    return 0


def parse_seeds(text: str) -> list[int]:
    """'0-4' -> [0, 1, 2, 3, 4]; '0,3,7' -> [0, 3, 7]."""
    lo, dash, hi = text.partition("-")
    return list(range(int(lo), int(hi) + 1)) if dash else [int(x) for x in text.split(",")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["frontier", "calibrate", "tune", "evaluate"])
    ap.add_argument("--methods", default="", help="calibrate: candidate labels; tune / evaluate: method names")
    ap.add_argument("--seeds", default="", help="e.g. 300-309 or 300,301 (default: the stage's seeds in SEEDS)")
    ap.add_argument("--pilot", action="store_true", help="evaluate: fewer seeds or methods, labelled, decides nothing")
    ap.add_argument("--render", action="store_true", help="evaluate: rewrite the .md / .png from the .json")
    ap.add_argument("--name", default="", help="results/NAME.{md,json} (default per stage)")
    ap.add_argument("--deviation", action="append", default=[],
                    help="evaluate: a deviation from heldout_plan.md, stated in the results (repeatable)")
    a = ap.parse_args()
    return {"frontier": frontier, "calibrate": calibrate, "tune": tune, "evaluate": evaluate}[a.stage](a)


if __name__ == "__main__":
    sys.exit(main())
