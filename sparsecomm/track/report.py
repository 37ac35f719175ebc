"""`sparsecomm report RUN_DIR`: a run's StepStats JSONL -> PNG figures and a Markdown summary.

Reads every `*.jsonl` under RUN_DIR (one per rank), and `hot_maps*.npz` if present, and writes
into RUN_DIR/report/ (or --out):

    sparsity.png   sparsity vs step, one line per definition (and per K-step window)
    layers.png     mean sparsity per layer kind, per definition
    hot.png        hot-parameter heatmaps (change frequency over the last window)
    rank.png       per-matrix rank / min(m, n) vs matrix size, with the random baseline
    comm.png       cumulative bytes sent vs the dense ring all-reduce; exchange vs dense time
    summary.md     the numbers behind the figures, each with its definition

    sparsecomm report runs/demo
"""
from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from .sinks import read_jsonl
from .stats import StepStats


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="run directory holding *.jsonl StepStats files")
    p.add_argument("--out", type=Path, default=None, help="output directory (default RUN_DIR/report)")


def markdown_table(headers: list, rows: list[list]) -> str:
    """A markdown table; a "|" inside a cell (e.g. |x|) is escaped so it does not end the cell."""

    def row(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return "\n".join([row(headers), "|" + "---|" * len(headers), *[row(r) for r in rows]]) + "\n"


def load_run(run_dir: Path) -> list[StepStats]:
    files = sorted(run_dir.rglob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no *.jsonl StepStats files under {run_dir}")
    return [s for f in files for s in read_jsonl(f)]


def series(stats: list[StepStats], key: str, rank: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
    pts = sorted((s.step, s.metrics[key]) for s in stats
                 if key in s.metrics and isinstance(s.metrics[key], (int, float)) and (rank is None or s.rank == rank))
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float)


def keys_like(stats: list[StepStats], prefix: str, suffix: str = "") -> list[str]:
    return sorted({k for s in stats for k in s.metrics if k.startswith(prefix) and k.endswith(suffix)})


def mean_of(stats, key, rank: int | None = 0) -> float:
    _, v = series(stats, key, rank)
    return float(np.mean(v)) if v.size else float("nan")


def make_report(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = load_run(run_dir)
    out = out or run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    ranks = sorted({s.rank for s in stats})
    r0 = ranks[0]
    md = [f"# sparsecomm report: {run_dir}\n", f"{len(stats)} records, ranks {ranks}, "
          f"steps {min(s.step for s in stats)}..{max(s.step for s in stats)}.\n",
          "Sparsity = fraction of entries NOT changed; definitions: fp32_exact (w_new != w_old), bf16_view "
          "(bf16(w_new) != bf16(w_old)), rel_threshold (|dw| > tau |w|), abs_threshold (|dw| > tau); "
          "sparsity_kK = between weights K steps apart.\n"]
    figs = []

    # 1. sparsity vs step per definition
    gkeys = [k for k in keys_like(stats, "sparsity", "/global")]
    if gkeys:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        md.append("\n## Sparsity (rank %d)\n\n| definition | mean | last |\n|---|---|---|\n" % r0)
        for k in gkeys:
            x, y = series(stats, k, r0)
            ax.plot(x, y, label=k.removesuffix("/global"), marker="." if x.size < 50 else None)
            md.append(f"| {k.removesuffix('/global')} | {np.mean(y):.4f} | {y[-1]:.4f} |\n")
        ax.set_xlabel("step"), ax.set_ylabel("sparsity (fraction unchanged)"), ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8), ax.grid(alpha=0.3), ax.set_title("Update sparsity by definition")
        figs.append(("sparsity.png", fig))

    # 2. layer-wise breakdown
    kind_keys = keys_like(stats, "sparsity/")
    kind_keys = [k for k in kind_keys if "/kind/" in k]
    if kind_keys:
        defs = sorted({k.split("/")[1] for k in kind_keys})
        kinds = sorted({k.split("/")[3] for k in kind_keys})
        fig, ax = plt.subplots(figsize=(8, 4.5))
        w = 0.8 / len(defs)
        md.append("\n## Sparsity by layer kind (mean over steps)\n\n| kind | " + " | ".join(defs) + " |\n|---|"
                  + "---|" * len(defs) + "\n")
        table = defaultdict(dict)
        for i, d in enumerate(defs):
            vals = [mean_of(stats, f"sparsity/{d}/kind/{kd}", r0) for kd in kinds]
            for kd, v in zip(kinds, vals):
                table[kd][d] = v
            ax.bar(np.arange(len(kinds)) + i * w, vals, w, label=d)
        for kd in kinds:
            md.append(f"| {kd} | " + " | ".join(f"{table[kd][d]:.4f}" for d in defs) + " |\n")
        ax.set_xticks(np.arange(len(kinds)) + w * (len(defs) - 1) / 2, kinds)
        ax.set_ylabel("mean sparsity"), ax.set_ylim(0, 1.02), ax.legend(fontsize=8), ax.set_title("Sparsity by layer kind")
        figs.append(("layers.png", fig))

    # 3. hot-parameter heatmaps
    npz = sorted(run_dir.rglob("hot_maps*.npz"))
    if npz:
        data = np.load(npz[0])
        last = max(int(k.split("/")[0][4:]) for k in data.files) if data.files else None
        names = [k for k in data.files if k.startswith(f"step{last}/")][:12]
        if names:
            cols = min(4, len(names))
            rows = math.ceil(len(names) / cols)
            fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3 * rows), squeeze=False)
            for ax, name in zip(axes.flat, names):
                im = ax.imshow(data[name], vmin=0, vmax=1, cmap="magma", aspect="auto")
                ax.set_title(name.split("/", 1)[1], fontsize=7), ax.set_xticks([]), ax.set_yticks([])
            for ax in list(axes.flat)[len(names):]:
                ax.axis("off")
            fig.colorbar(im, ax=axes, shrink=0.6, label="fraction of window steps changed")
            fig.suptitle(f"Hot parameters, window ending at step {last} ({npz[0].name})")
            figs.append(("hot.png", fig))
            md.append(f"\n## Hot parameters\n\nFraction of weights changed in more than half the window's steps: "
                      f"{mean_of(stats, 'hot/frac_changed_gt_half/global', r0):.4f} (mean over windows).\n")

    # 4. rank vs matrix size
    rkeys = keys_like(stats, "rank/grad/entropy/")
    if rkeys:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        md.append("\n## Gradient rank per matrix (mean over measured steps)\n\n"
                  "| matrix | min(m,n) | token bound | stable | entropy | random stable | random entropy |\n"
                  "|---|---|---|---|---|---|---|\n")
        for k in rkeys:
            name = k[len("rank/grad/entropy/"):]
            mn = mean_of(stats, f"rank/grad/bound_min_mn/{name}", r0)
            er = mean_of(stats, k, r0)
            sr = mean_of(stats, f"rank/grad/stable/{name}", r0)
            rer = mean_of(stats, f"rank/grad/random_entropy/{name}", r0)
            rsr = mean_of(stats, f"rank/grad/random_stable/{name}", r0)
            tok = mean_of(stats, f"rank/grad/bound_tokens/{name}", r0)
            ax.scatter(mn, er / mn, c="C0", s=14)
            ax.scatter(mn, rer / mn, c="C1", s=14, marker="x")
            md.append(f"| {name} | {mn:.0f} | {tok:.0f} | {sr:.2f} | {er:.1f} | {rsr:.2f} | {rer:.1f} |\n")
        ax.scatter([], [], c="C0", label="gradient entropy rank / min(m,n)")
        ax.scatter([], [], c="C1", marker="x", label="random same-shape matrix")
        ax.set_xscale("log"), ax.set_xlabel("min(m, n)"), ax.set_ylabel("entropy rank / min(m, n)")
        ax.legend(fontsize=8), ax.set_title("Gradient rank vs matrix size")
        figs.append(("rank.png", fig))
        sk = keys_like(stats, "rank/stacked/entropy")
        if sk:
            md.append(f"\nStacked-gradient SVD (the plan's method; bounded by k = "
                      f"{mean_of(stats, 'rank/stacked_bound_k', r0):.0f} stacked batches by construction): "
                      f"entropy rank {mean_of(stats, sk[0], r0):.2f}.\n")

    # 5. bytes and time vs dense
    if keys_like(stats, "comm/sent_bytes"):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        x, sent = series(stats, "comm/sent_bytes", r0)
        _, dense = series(stats, "comm/dense_equiv_bytes", r0)
        a1.plot(x, np.cumsum(sent) / 1e6, label="sent (encoded, headers included)")
        if dense.size == sent.size:
            a1.plot(x, np.cumsum(dense) / 1e6, label="dense ring all-reduce (formula)")
        a1.set_xlabel("step"), a1.set_ylabel("cumulative MB per worker"), a1.legend(fontsize=8), a1.set_yscale("log")
        xe, ex = series(stats, "timing/exchange_s", r0)
        xd, dd = series(stats, "timing/dense_allreduce_s", r0)
        if ex.size:
            a2.plot(xe, ex, ".", label="sparse exchange (select..apply)")
        if dd.size:
            a2.plot(xd, dd, "x", label="dense all_reduce (measured)")
        a2.set_xlabel("step"), a2.set_ylabel("seconds"), a2.legend(fontsize=8)
        fig.suptitle("Communication vs dense")
        figs.append(("comm.png", fig))
        tot_sent, tot_dense = float(np.sum(sent)), float(np.sum(dense))
        md.append(f"\n## Communication (rank {r0})\n\n- bytes sent (encoded buffers, headers included): {tot_sent:,.0f}\n"
                  f"- dense ring all-reduce equivalent: {tot_dense:,.0f}"
                  + (f" ({tot_dense / tot_sent:.1f}x more)" if tot_sent else "") + "\n")
        if ex.size:
            md.append(f"- mean sparse exchange time: {np.mean(ex):.4f} s\n")
        if dd.size:
            md.append(f"- mean measured dense all_reduce time: {np.mean(dd):.4f} s ({dd.size} measurements)\n")

    _, rw = series(stats, "train/reward", r0)
    if rw.size:
        md.append(f"\n## Reward\n\nfirst {rw[0]:.4f}, last {rw[-1]:.4f}, max {rw.max():.4f}\n")
    for name, fig in figs:
        fig.tight_layout() if name != "hot.png" else None
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        md.append(f"\n![{name}]({name})\n")
    (out / "summary.md").write_text("".join(md))
    return out


def run(args: argparse.Namespace) -> int:
    out = make_report(args.run_dir, args.out)
    print(f"wrote {out}/summary.md and {len(list(out.glob('*.png')))} figures")
    return 0
