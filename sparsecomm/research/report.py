"""REPORT.md, figures and tables for a research matrix directory, derived from its runs alone.

    python -m sparsecomm.research.report runs/matrix-full     # or: sparsecomm matrix ... --report-only
    sparsecomm matrix --preset full --out benchmarks/results/research --report-only
                                                              # the committed report, from its tables.json

Writes OUT/REPORT.md, OUT/figures/*.png and OUT/tables.json. Every verdict comes from
sparsecomm.research.analysis (statistics: sparsecomm.research.stats, i.e. scipy); the text around
it only reports numbers. When OUT has no run directories (the committed copy: runs are not
checked in) the records are read back from OUT/tables.json, which holds every per-run summary;
the three figures drawn from per-step curves or hot maps (not in tables.json) are then kept as
they are and marked so in the report.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from ..track.report import markdown_table
from . import analysis as A

# What the literature cited in DESIGN.md measured, for the comparison lines (fixed references).
LITERATURE = {
    "98-99% of weights unchanged per step": (
        "PULSE (arXiv 2602.03839) reports ~99% of bf16 weights unchanged per RL step and attributes it to bf16 "
        "rounding of Adam steps of ~lr (1e-6..3e-6) below half a bf16 ULP of |w|; fp32 master weights change almost "
        "everywhere."),
    "attention < FFN < LayerNorm (sparsity by layer kind)": (
        "Mukherjee et al. (arXiv 2505.11711) find RL update sparsity roughly uniform across parameter matrices."),
    "updates get sparser over time": (
        "Mukherjee et al. measure 5-30% of weights changed over a whole RL run (70-95% accumulated sparsity), "
        "i.e. the same small subset keeps being updated."),
    "RL updates are sparser than SFT updates": (
        "Mukherjee et al. report RL fine-tuning updates far sparser than SFT's on the same models, at each one's usual "
        "learning rate."),
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, name: str, dpi: int = 110, tight: bool = True) -> str:
    """Write OUT/<name>.png, close the figure, return its path relative to the report."""
    import matplotlib.pyplot as plt

    if tight:
        fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=dpi)
    plt.close(fig)
    return f"figures/{name}.png"


def _smooth(y, w=10):
    y = np.asarray(y, dtype=float)
    if y.size < w:
        return y
    return np.convolve(np.nan_to_num(y, nan=np.nanmean(y) if np.isfinite(y).any() else 0.0), np.ones(w) / w, mode="valid")


def _mean_curve(curves):
    n = min((len(c) for c in curves), default=0)
    return np.nanmean(np.array([c[:n] for c in curves], dtype=float), axis=0) if n else np.array([])


def _base(records, **kw):
    match = {"model": "tiny", "optimizer": "adamw", "phase": "rl", "precision": "fp32", "reward": "default", **kw}
    return [r for r in A.select(records, "size_lr") if all(r.get(k) == v for k, v in match.items())]


def fig_sparsity_vs_step(records, out: Path) -> str | None:
    lrs = sorted({r["lr"] for r in _base(records)})
    if not lrs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(lrs), figsize=(4.5 * len(lrs), 3.6), squeeze=False, sharey=True)
    for ax, lr in zip(axes[0], lrs):
        runs = _base(records, lr=lr)
        for d in A.DEFS:
            y = _mean_curve([r[f"curve/{d}"] for r in runs])
            ax.plot(np.arange(1, y.size + 1), y, label=d)
        ax.set_title(f"tiny, GRPO, AdamW, lr {lr:g} ({len(runs)} seed(s))")
        ax.set_xlabel("RL step")
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("fraction of weights unchanged per step")
    axes[0][-1].legend(fontsize=8)
    return _save(fig, out, "fig1_sparsity_vs_step")


def fig_layers(records, out: Path) -> str | None:
    runs = A.select(records, "size_lr")
    lrs = sorted({r["lr"] for r in runs})
    kinds = ("embedding", "attention", "mlp", "norm")
    if not lrs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, view in zip(axes, A.VIEWS):
        width = 0.8 / len(lrs)
        for i, lr in enumerate(lrs):
            sub = [r for r in runs if r["lr"] == lr]
            vals = [A._mean(r.get(f"kind/{view}/{k}", float("nan")) for r in sub) for k in kinds]
            ax.bar(np.arange(len(kinds)) + i * width, vals, width, label=f"lr {lr:g}")
        ax.set_xticks(np.arange(len(kinds)) + 0.4 - width / 2, kinds)
        ax.set_title(f"per-step sparsity by layer kind ({view})")
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("fraction unchanged")
    axes[1].legend(fontsize=8)
    return _save(fig, out, "fig2_layers")


def rank_rows(records) -> list[dict]:
    """Per run: mean over matrices of rank / min(m, n) (gradient; stable and entropy), the same for a
    random matrix of each shape, and the stacked method's numbers (bounded by k)."""
    rows = []
    for r in A.select(records, "size_lr"):
        names = [k[len("rank/grad/stable/"):] for k in r if k.startswith("rank/grad/stable/")]
        if not names:
            continue
        row = {"model": r["model"], "lr": r["lr"], "seed": r["seed"], "matrices": len(names)}
        for m in ("stable", "entropy", "random_stable", "random_entropy"):
            row[m] = A._mean(r[f"rank/grad/{m}/{n}"] / r[f"rank/grad/bound_min_mn/{n}"] for n in names)
        row["min_mn_mean"] = A._mean(r[f"rank/grad/bound_min_mn/{n}"] for n in names)
        row["stacked_energy99"] = r.get("rank/stacked/energy99", float("nan"))
        row["stacked_entropy"] = r.get("rank/stacked/entropy", float("nan"))
        row["stacked_k"] = r.get("rank/stacked_bound_k", float("nan"))
        rows.append(row)
    return rows


SIZE_ORDER = ("tiny", "small", "medium", "gpt2", "gpt2-medium", "gpt2-large")


def fig_rank(rows, out: Path) -> str | None:
    models = [m for m in SIZE_ORDER if any(r["model"] == m for r in rows)]
    if not models:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    x = np.arange(len(models))
    for key, label in (("stable", "stable rank"), ("entropy", "entropy rank"), ("random_stable", "random: stable"),
                       ("random_entropy", "random: entropy")):
        axes[0].plot(x, [A._mean(r[key] for r in rows if r["model"] == m) for m in models], "o-" if "random" not in key else "o--",
                     label=label)
    axes[0].set_xticks(x, models)
    axes[0].set_ylabel("rank / min(m, n), mean over matrices")
    axes[0].set_title("per-matrix gradient rank (correct measure)")
    axes[0].legend(fontsize=8)
    for key, label in (("stacked_energy99", "99% energy"), ("stacked_entropy", "entropy rank"), ("stacked_k", "bound k")):
        axes[1].plot(x, [A._mean(r[key] for r in rows if r["model"] == m) for m in models], "o-", label=label)
    axes[1].set_xticks(x, models)
    axes[1].set_ylabel("rank of k stacked flattened gradients")
    axes[1].set_title("the plan's stacked method (<= k by construction)")
    axes[1].legend(fontsize=8)
    return _save(fig, out, "fig3_rank")


def fig_kstep(records, out: Path) -> str | None:
    runs = _base(records)
    ks = sorted({int(k[len("kstep"):].split("/")[0]) for r in runs for k in r if k.startswith("kstep")})
    lrs = sorted({r["lr"] for r in runs})
    if not ks or not lrs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for view, style in zip(A.VIEWS, ("-", "--")):
        for lr in lrs:
            sub = [r for r in runs if r["lr"] == lr]
            y = [A._mean(r[f"sparsity/{view}"] for r in sub)] + [A._mean(r.get(f"kstep{k}/{view}", float("nan")) for r in sub) for k in ks]
            ax.plot([1, *ks], y, "o" + style, label=f"{view}, lr {lr:g}")
    ax.set_xscale("log")
    ax.set_xlabel("K (steps between the compared weights)")
    ax.set_ylabel("fraction unchanged over K steps")
    ax.set_title("accumulated (K-step) sparsity, tiny / GRPO / AdamW")
    ax.legend(fontsize=7)
    return _save(fig, out, "fig_kstep")


def fig_hot(records, out: Path) -> str | None:
    runs = sorted(_base(records), key=lambda r: (r["seed"], r["lr"]))
    runs = [r for r in runs if (Path(r["dir"]) / "hot_maps_rank0.npz").exists()]
    if not runs:
        return None
    lrs = sorted({r["lr"] for r in runs})
    plt = _plt()
    picks = []
    for lr in lrs:
        r = next(r for r in runs if r["lr"] == lr)
        z = np.load(Path(r["dir"]) / "hot_maps_rank0.npz")
        last = max({int(k.split("/")[0][4:]) for k in z.files}, default=None)
        if last is None:
            continue
        names = sorted(k for k in z.files if k.startswith(f"step{last}/"))
        chosen = [next((k for k in names if part in k), None) for part in ("c_attn", "c_fc", "wte")]  # one per kind
        picks.append((lr, [(k.split("/", 1)[1], z[k]) for k in chosen if k]))
    cols = max((len(p[1]) for p in picks), default=0)
    if not cols:
        return None
    fig, axes = plt.subplots(len(picks), cols, figsize=(3.2 * cols, 2.8 * len(picks)), squeeze=False)
    for i, (lr, maps) in enumerate(picks):
        for j in range(cols):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(maps):
                name, m = maps[j]
                im = ax.imshow(m, vmin=0, vmax=1, cmap="magma", aspect="auto")
                ax.set_title(f"lr {lr:g}: {name.replace('transformer.', '')}", fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.6, label="fraction of window steps changed (bf16 view)")
    return _save(fig, out, "fig_hot", dpi=100, tight=False)


def fig_h1(records, out: Path) -> str | None:
    runs = A.select(records, "h1") + [r for r in A.select(records, "h3") if r["variant"] == "per-kind-1%"]
    variants = sorted({r["variant"] for r in runs})
    if not variants:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for v in variants:
        curves = [r["reward_curve"] for r in runs if r["variant"] == v]
        y = _smooth(_mean_curve(curves), 20)
        ax.plot(np.arange(y.size) + 20, y, label=f"{v} ({len(curves)} seeds)")
    ax.set_xlabel("RL step")
    ax.set_ylabel("sampled reward (mean over seeds, 20-step average)")
    ax.set_title("H1/H3: reward at equal steps")
    ax.legend(fontsize=8)
    return _save(fig, out, "fig_h1_h3_reward")


def fig_h2(records, out: Path) -> str | None:
    runs = [r for r in records if r["phase"] == "rl" and not r.get("variant")]
    if len(runs) < 2:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, view in zip(axes, A.VIEWS):
        for lr in sorted({r["lr"] for r in runs}):
            sub = [r for r in runs if r["lr"] == lr]
            ax.scatter([r[f"sparsity/{view}"] for r in sub], [r["reward_gain"] for r in sub], s=14, label=f"lr {lr:g}")
        ax.set_xlabel(f"mean per-step sparsity ({view})")
        ax.set_title(f"H2: sparsity vs reward gain ({view})")
    axes[0].set_ylabel("reward gain (last - first window)")
    axes[1].legend(fontsize=8)
    return _save(fig, out, "fig_h2")


# ------------------------------------------------------------------------------ tables

def _ms(vals, pct=True) -> str:
    m, s, n = A.mean_sd(list(vals))
    if not n:
        return "–"
    f = (lambda x: f"{100 * x:.2f}%") if pct else (lambda x: f"{x:.3f}")
    return f(m) + (f" ± {f(s)}" if n > 1 else "")


def table(records, rows_key, group: str, match: dict | None = None, extra_cols=()) -> tuple[list[str], list[list[str]]]:
    runs = A.select(records, group, **(match or {}))
    keys = sorted({tuple(r[k] for k in rows_key) for r in runs}, key=lambda t: tuple(str(x) if isinstance(x, str) else f"{x:012.7f}" for x in t))
    head = [*rows_key, "runs", "fp32 exact", "bf16 view", "rel 1e-3", "lr / median abs(w)", *[c[0] for c in extra_cols]]
    body = []
    for key in keys:
        sub = [r for r in runs if tuple(r[k] for k in rows_key) == key]
        body.append([*(f"{x:g}" if isinstance(x, float) else str(x) for x in key), str(len(sub)),
                     _ms(r["sparsity/fp32_exact"] for r in sub), _ms(r["sparsity/bf16_view"] for r in sub),
                     _ms(r["sparsity/rel_threshold"] for r in sub), f"{A._mean(r['lr_over_median_abs_w'] for r in sub):.2g}",
                     *[c[1](sub) for c in extra_cols]])
    return head, body


def kstep_table(records) -> str:
    """Per-step vs K-step sparsity of the base runs (tiny, GRPO, AdamW), per view and learning rate."""
    runs = _base(records)
    ks = sorted({int(k[len("kstep"):].split("/")[0]) for r in runs for k in r if k.startswith("kstep")})
    body = []
    for view in A.VIEWS:
        for lr in sorted({r["lr"] for r in runs}):
            sub = [r for r in runs if r["lr"] == lr]
            body.append([view, f"{lr:g}", str(len(sub)), _ms(r[f"sparsity/{view}"] for r in sub),
                         *[_ms(r.get(f"kstep{k}/{view}", float("nan")) for r in sub) for k in ks]])
    return md_table(["view", "lr", "runs", "per step", *[f"over {k} steps" for k in ks]], body)


def md_table(head, body) -> str:
    return markdown_table(head, body) if body else "_(no runs)_\n"


def _reward_col(sub):
    return _ms((r["reward_last"] for r in sub), pct=False)


def _outcome_col(sub):
    """Final reward for RL runs, final loss for SFT / pretraining (GRPO's loss is not comparable)."""
    if all(r["phase"] == "rl" for r in sub):
        return "reward " + _ms((r["reward_last"] for r in sub), pct=False)
    return "loss " + _ms((r["loss_last"] for r in sub), pct=False)


# ------------------------------------------------------------------------------ the report

# Figures drawn from per-step data that tables.json does not keep: (report key, function, file, what it needs)
CURVE_FIGURES = (("fig1", fig_sparsity_vs_step, "fig1_sparsity_vs_step", "curve/fp32_exact"),
                 ("hot", fig_hot, "fig_hot", None), ("h1", fig_h1, "fig_h1_h3_reward", "reward_curve"))


def _curve_figures(records, figdir: Path, from_tables: bool) -> tuple[dict, list[str]]:
    """Draw the per-step figures from the runs; re-deriving from tables.json, keep the files drawn
    from the runs (returned in the second list, so the report says which figures those are)."""
    figs, kept = {}, []
    for key, f, fname, need in CURVE_FIGURES:
        if from_tables:
            figs[key] = f"figures/{fname}.png" if (figdir / f"{fname}.png").exists() else None
            kept += [fname] if figs[key] else []
        else:
            figs[key] = f(records, figdir) if need is None or any(need in r for r in records) else None
    return figs, kept


def _runs_dir(records, source: dict) -> str:
    if source.get("runs_dir"):
        return source["runs_dir"]
    parents = sorted({str(Path(r["dir"]).parent.parent) for r in records if r.get("dir")})
    return parents[0] if len(parents) == 1 else "?"


def write_report(out: Path) -> Path:
    out = Path(out)
    records = A.load_runs(out)
    from_tables = not records and (out / "tables.json").exists()
    source = {}
    if from_tables:  # the committed report: no run directories, every per-run summary is in tables.json
        records = A.load_tables(out / "tables.json")
        source = json.loads((out / "tables.json").read_text()).get("source") or {}
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    meta = json.loads((out / "matrix.json").read_text()) if (out / "matrix.json").exists() else {"preset": "?", "notes": []}
    verdicts = A.all_verdicts(records) if records else []
    ranks = rank_rows(records)
    figs, kept = _curve_figures(records, figdir, from_tables) if records else ({}, [])
    figs.update({name: f(records, figdir) for name, f in (("fig2", fig_layers), ("kstep", fig_kstep), ("h2", fig_h2))}
                if records else {})
    figs["fig3"] = fig_rank(ranks, figdir) if ranks else None
    failed = sorted(p.parent.name for p in (out / "runs").glob("*/error.txt")) if (out / "runs").exists() else []
    runs_dir = _runs_dir(records, source) if from_tables else str(out)
    source = {"runs_dir": runs_dir, "runs": len(records), "preset": meta["preset"]}
    regen = f"sparsecomm matrix --preset {meta['preset']} --out {out} --report-only"

    L = [f"# sparsecomm research matrix: {meta['preset']} preset\n",
         f"Generated by `sparsecomm.research.report` from {len(records)} finished runs of "
         f"`sparsecomm matrix --preset {meta['preset']} --out {runs_dir}`"
         + (f" (the run directories are not committed; their per-run summaries are in `{out}/tables.json`)"
            if from_tables else "")
         + f", on {time.strftime('%Y-%m-%d')} ({platform.machine()}, {platform.processor() or 'cpu'}, Python "
         f"{sys.version.split()[0]}). Regenerate this report, its tables and figures from the JSON in this directory, "
         f"without training anything: `{regen}`. Nothing in this file is written by hand: verdicts come from "
         "`sparsecomm/research/analysis.py`, their statistics from scipy (`sparsecomm/research/stats.py`).\n"]
    if kept:
        L += [f"Figures drawn from per-step curves or hot maps, which tables.json does not keep, are the ones drawn from "
              f"the runs themselves: {', '.join(f'`figures/{k}.png`' for k in kept)}.\n"]
    if meta.get("notes"):
        L += ["Notes:\n", *[f"- {n}" for n in meta["notes"]], ""]
    if failed:
        L += [f"Failed runs (excluded): {', '.join(failed)}\n"]
    L += ["## Definitions\n",
          "Sparsity = fraction of weights NOT changed by one optimizer step, in [0, 1]: `fp32 exact` (the fp32 master "
          "weight changed at all), `bf16 view` (its bf16 rounding changed: what a bf16 copy sees), `rel 1e-3` "
          "(|dw| > 1e-3 |w|). K-step sparsity compares weights K steps apart. Every run: a dense SFT warm start on "
          "1-digit addition, then the measured phase (GRPO unless stated) of a randomly initialised GPT-2-style model "
          "with a character tokenizer, one process, CPU. Means are over steps, then over seeds (± one standard "
          "deviation over seeds). AdamW's decoupled weight decay (0.01, torch default) moves every nonzero fp32 "
          "weight every step.\n",
          "## Statistics\n",
          "Every verdict about sparsity is computed per optimizer (AdamW, SGD, Adafactor, ASPG) and per task kind (the "
          "measured phase: rl, sft, pretrain), on fp32-master-weight runs, and never pooled across optimizers. Each states "
          "its n, its test and a 95% interval, all from scipy: an exact sign test (binomial against 1/2, Clopper-Pearson "
          "interval) for claims of the form \"in what fraction of runs\" (a claim holds when it does in >= "
          f"{A.MAJORITY:.0%} of the runs and the one-sided sign test gives p < 0.05); a paired t test by seed (t interval of "
          "the mean difference, effect size d_z) for reward comparisons and mean differences; Pearson r with its Fisher-z "
          f"interval for H2. A stratum with fewer than {A.S.MIN_N} runs (or pairs, or common seeds) is **inconclusive**, "
          "whatever its point estimate. RL vs SFT is judged only on pairs at the same learning rate.\n",
          "## Verdicts\n",
          md_table(["expected outcome / hypothesis", "verdict", "how it was judged"],
                   [[v.claim, f"**{v.outcome}**", v.method] for v in verdicts])]
    for v in verdicts:
        L += [f"### {v.claim}: {v.outcome}\n", *[f"- {part}" for part in v.text.split(" | ")], ""]
        if v.claim in LITERATURE:
            L += [f"Published: {LITERATURE[v.claim]} Compared with this run: **{A.published_comparison(v)}**.\n"]
        nums = json.dumps(v.numbers, indent=1)
        cut = len(nums) > 3000  # the whole of it is in tables.json
        L += ["```json", nums[:3000] + ("\n... (cut here; every number is in tables.json)" if cut else ""), "```\n"]
    L += ["## Figure 1: sparsity vs step, every definition\n", f"![]({figs.get('fig1')})\n" if figs.get("fig1") else "_(no runs)_\n",
          "## Figure 2: layer-wise breakdown\n", f"![]({figs.get('fig2')})\n" if figs.get("fig2") else "_(no runs)_\n",
          "## Figure 3: gradient rank vs model size\n",
          "Left: per-matrix stable rank ‖G‖²_F/‖G‖²₂ and entropy rank of single-step gradients, as a fraction of "
          "min(m, n), with a same-shape Gaussian matrix for reference. Right: the plan's method (SVD of k stacked "
          "flattened gradients), which cannot exceed k.\n",
          f"![]({figs.get('fig3')})\n" if figs.get("fig3") else "_(no rank data)_\n",
          md_table(["model", "runs", "matrices", "mean min(m,n)", "stable/min(m,n)", "entropy/min(m,n)", "random stable",
                    "random entropy", "stacked 99% energy", "stacked entropy", "k"],
                   [[m, str(len(sub)), f"{A._mean(r['matrices'] for r in sub):.0f}", f"{A._mean(r['min_mn_mean'] for r in sub):.0f}",
                     *[f"{A._mean(r[k] for r in sub):.3f}" for k in ("stable", "entropy", "random_stable", "random_entropy")],
                     *[f"{A._mean(r[k] for r in sub):.1f}" for k in ("stacked_energy99", "stacked_entropy", "stacked_k")]]
                    for m in SIZE_ORDER for sub in [[r for r in ranks if r["model"] == m]] if sub]),
          "## Table 1: sparsity across tasks (measured phase)\n", "At the same learning rates:\n",
          md_table(*table(records, ("phase", "lr"), "task", extra_cols=(("final reward / loss", _outcome_col),))),
          "At each phase's customary rate:\n",
          md_table(*table(records, ("phase", "lr"), "task_customary", extra_cols=(("final reward / loss", _outcome_col),))),
          "## 1A: model size x learning rate (GRPO, AdamW)\n",
          md_table(*table(records, ("model", "lr"), "size_lr", extra_cols=(("final reward", _reward_col),))),
          "## 1A: optimizers\n",
          md_table(*table(records, ("optimizer", "lr"), "optimizer", extra_cols=(("final reward", _reward_col),))),
          "At each optimizer's customary rate:\n",
          md_table(*table(records, ("optimizer", "lr"), "optimizer_customary", extra_cols=(("final reward", _reward_col),))),
          "## 1A: rewards (lr 1e-5)\n",
          md_table(*table(records, ("reward",), "reward", extra_cols=(("final reward", _reward_col),))),
          "## 1A: precision: fp32 master weights vs pure bf16\n",
          "In pure bf16 the weights are bf16, so `fp32 exact` and `bf16 view` coincide.\n",
          md_table(*table(records, ("precision", "lr"), "precision", extra_cols=(("final reward", _reward_col),))),
          "## Accumulated (K-step) sparsity\n", f"![]({figs.get('kstep')})\n" if figs.get("kstep") else "_(no runs)_\n",
          kstep_table(records),
          "## 1B: which weights change (hot-parameter maps, last window)\n",
          f"![]({figs.get('hot')})\n" if figs.get("hot") else "_(no hot maps)_\n",
          md_table(["lr", "runs", "frac changed in > half the window (bf16 view)"],
                   [[f"{lr:g}", str(len(sub)), _ms(r.get("hot_frac/global", float("nan")) for r in sub)]
                    for lr in sorted({r["lr"] for r in _base(records)}) for sub in [_base(records, lr=lr)]]),
          "## Hypotheses\n", f"![]({figs.get('h1')})\n" if figs.get("h1") else "", f"![]({figs.get('h2')})\n" if figs.get("h2") else "",
          md_table(["variant", "runs", "final reward", "ASPG payload per step (mean)", "fp32 entries changed per step"],
                   [[v, str(len(sub)), _reward_col(sub),
                     f"{A._mean(r['payload_bytes'] / max(r['steps_recorded'], 1) for r in sub):,.0f} B" if sub[0]["optimizer"] == "aspg" else "– (dense)",
                     _ms(1 - r["sparsity/fp32_exact"] for r in sub)]
                    for v in sorted({r['variant'] for r in records if r.get('variant')})
                    for sub in [[r for r in records if r.get('variant') == v]]]),
          "(One process per run: the payload is the encoded delta ASPG would put on the wire per step; bytes against a "
          "dense exchange with several workers are measured in benchmarks/results/convergence.md.)\n",
          "## Scale caveat\n",
          "These are 0.1M-10M-parameter models on CPU, far from the 1B+ models the plan targets. What transfers is the "
          "mechanism (which definition, which learning rate relative to |w|); the lr / median |w| column lets the "
          "reader place a run relative to a large model's (e.g. lr 1e-6 on |w| ~ 1e-2 gives 1e-4).\n"]
    (out / "REPORT.md").write_text("\n".join(L))
    (out / "tables.json").write_text(json.dumps({"source": source, "verdicts": [v.__dict__ for v in verdicts], "rank": ranks,
                                                 "runs": [{k: v for k, v in r.items() if not k.startswith("curve/") and k != "reward_curve"}
                                                          for r in records]}, indent=1, default=str))
    return out / "REPORT.md"


if __name__ == "__main__":
    print(write_report(Path(sys.argv[1])))
