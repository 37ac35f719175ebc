"""`sparsecomm matrix`: the research plan's experiment matrix (1A-1C, H1-H3) as real runs, then a report.

    sparsecomm matrix --preset quick --out runs/matrix-quick      # 51 runs, ~2.5 min on 2 cores
    sparsecomm matrix --preset full  --out runs/matrix-full       # 150 runs, ~33 min on 2 cores
    sparsecomm matrix --preset full  --out runs/matrix-full --report-only   # re-derive the report
    sparsecomm matrix --preset full  --out benchmarks/results/research --report-only
                                            # the committed report, from its tables.json (no training)

Every run is one single-process training job (sparsecomm.rl.trainer: a dense SFT warm start on
the task, then the measured phase with the run's optimizer and learning rate, fully tracked) in
OUT/runs/<name>/. Runs whose summary.json exists are skipped, so an interrupted matrix resumes
where it stopped; `--jobs` runs execute at once (default: one per core, one thread each).

The matrix is one factor at a time around a base run (tiny model, 1-digit addition, GRPO, AdamW,
lr 1e-5, fp32 master weights, default reward), not a full factorial:

    1A size x lr       model {tiny, small, medium; gpt2, gpt2-medium, gpt2-large when present
                       locally} x lr {1e-6, 1e-5, 1e-4}
    1A optimizer       {adamw, sgd, adafactor, aspg} x lr {1e-6, 1e-5, 1e-4}, and each at its
                       customary rate
    1A task            measured phase {rl, sft, pretrain} x lr {1e-6, 1e-5, 1e-4}, and each at
                       its customary rate
    1A reward          {default, helpful, harmless, truthful}
    1A precision       {fp32 master weights, pure bf16} x lr
    H1                 dense AdamW vs ASPG top-k vs random-k at equal density (1% and 10%),
                       at the RL recipe's rate, several seeds, equal steps
    H3                 ASPG with one global budget vs per-tensor vs per-layer-kind densities at
                       the same total budget

1B (hot-parameter maps) and 1C (gradient rank, per matrix and the plan's stacked method) are
recorded on every run; H2 (does sparsity predict reward?) correlates the RL runs. The report
(REPORT.md, figures, tables) is derived by sparsecomm.research.report from the runs alone.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

LRS = (1e-6, 1e-5, 1e-4)
OPTIMIZERS = ("adamw", "sgd", "adafactor", "aspg")
PHASES = ("rl", "sft", "pretrain")
REWARDS = ("default", "helpful", "harmless", "truthful")
BUILTIN_SIZES = ("tiny", "small", "medium")
HF_SIZES = ("gpt2", "gpt2-medium", "gpt2-large")
# Customary rates for these tiny models in this repo's recipes: RL fine-tunes gently (the demo
# recipe's rl_lr), SFT and pretraining at the usual small-model rates; SGD needs a larger step.
CUSTOMARY_LR = {"rl": 3e-4, "sft": 1e-3, "pretrain": 1e-3,
                "adamw": 3e-4, "aspg": 3e-4, "adafactor": 3e-4, "sgd": 3e-2}
BASE = dict(model="tiny", lr=1e-5, optimizer="adamw", phase="rl", reward="default", precision="fp32")


@dataclass(frozen=True)
class RunSpec:
    """One training run of the matrix; `name` is derived from every setting, so specs dedupe."""
    model: str = "tiny"
    lr: float = 1e-5
    optimizer: str = "adamw"
    phase: str = "rl"
    reward: str = "default"
    precision: str = "fp32"
    seed: int = 0
    steps: int = 200
    variant: str = ""
    """A label for extra settings (H1/H3): "" or e.g. "aspg-1%"."""
    extra: tuple = ()
    """Extra key=value overrides that go with the variant."""
    groups: tuple = field(default=(), compare=False, hash=False)

    @property
    def name(self) -> str:
        v = f"_{self.variant}" if self.variant else ""
        return (f"{self.model}_{self.phase}_{self.optimizer}_lr{self.lr:g}_{self.reward}_{self.precision}"
                f"{v}_n{self.steps}_s{self.seed}")

    def overrides(self, run_dir: Path, preset: "Preset") -> list[str]:
        return [f"run_dir={run_dir}", f"model={self.model}", f"rl_lr={self.lr!r}", f"optimizer={self.optimizer}",
                f"phase={self.phase}", f"reward={self.reward}", f"precision={self.precision}", f"seed={self.seed}",
                f"rl_steps={self.steps}", *preset.common, *self.extra]


@dataclass
class Preset:
    seeds: tuple
    hyp_seeds: tuple
    steps: int
    hyp_steps: int
    sizes: tuple
    lrs: tuple = LRS
    common: tuple = ()


PRESETS = {
    # a test-sized matrix: every axis present, a few steps each
    "test": Preset(seeds=(0,), hyp_seeds=(0, 1), steps=12, hyp_steps=12, sizes=("tiny",), lrs=(1e-6, 1e-4),
                   common=("sft_steps=20", "prompts_per_step=4", "grpo.group_size=4", "eval_size=20", "sft_batch=8",
                           "k_steps=[4]", "hot_window=4", "rank_every=6", "rank_stack=3")),
    "quick": Preset(seeds=(0,), hyp_seeds=(0, 1), steps=80, hyp_steps=150, sizes=("tiny", "small"),
                    common=("sft_steps=150", "eval_size=100", "k_steps=[10, 40]", "hot_window=40", "rank_every=40",
                            "rank_stack=8")),
    "full": Preset(seeds=(0, 1, 2), hyp_seeds=(0, 1, 2, 3, 4), steps=200, hyp_steps=400, sizes=BUILTIN_SIZES,
                   common=("sft_steps=150", "eval_size=200", "k_steps=[10, 50]", "hot_window=50", "rank_every=50",
                           "rank_stack=8")),
}
COMMON = ("task=addition", "task_kwargs={digits: 1}", "comm=local", "console_every=1000000", "per_param_stats=false",
          "tracker_mode=fp32", "whole_run_rank=true")  # W_end - W_start rank + token bound in every summary.json


def hf_model_available(name: str) -> bool:
    """True when `name` loads from a local path or the HF cache (nothing is downloaded)."""
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(name, local_files_only=True)
        return True
    except Exception:
        return False


def kind_budget(model: str, density: float, dense_kinds=("norm",)) -> dict:
    """Per-layer-kind densities for H3: `dense_kinds` sent whole, the other kinds one shared density
    chosen so the total entries sent equal a global budget of `density` (when the dense kinds
    alone stay under it)."""
    from ..rl.models import build_model, char_tokenizer
    from ..track.layers import named_parameter_kinds

    m, _ = build_model(model, char_tokenizer())
    kinds = named_parameter_kinds(m)
    sizes: dict[str, int] = {}
    for n, p in m.named_parameters():
        sizes[kinds[n]] = sizes.get(kinds[n], 0) + p.numel()
    total, dense = sum(sizes.values()), sum(sizes[k] for k in dense_kinds if k in sizes)
    rest = max((density * total - dense) / max(total - dense, 1), 1e-4)
    return {k: (1.0 if k in dense_kinds else round(rest, 6)) for k in sizes}


def kind_density_override(model: str, density: float) -> str:
    """kind_budget as a TrainConfig override: 'kind_density={attention: ..., norm: 1.0, ...}'."""
    return "kind_density={" + ", ".join(f"{k}: {v}" for k, v in sorted(kind_budget(model, density).items())) + "}"


def build_matrix(preset_name: str) -> tuple[list[RunSpec], list[str]]:
    """The preset's runs (deduplicated; each tagged with the experiment groups it belongs to) and notes."""
    p = PRESETS[preset_name]
    notes: list[str] = []
    specs: dict[str, RunSpec] = {}

    def add(group: str, **kw):
        s = RunSpec(**{**BASE, "steps": p.steps, **kw})
        old = specs.get(s.name)
        specs[s.name] = RunSpec(**{**s.__dict__, "groups": tuple(sorted(set((old.groups if old else ()) + (group,))))})

    sizes = list(p.sizes)
    if preset_name == "full":
        for hf in HF_SIZES:
            if hf_model_available(hf):
                sizes.append(hf)
            else:
                notes.append(f"{hf}: skipped, its weights are not available locally (nothing is downloaded at run time)")
    for seed in p.seeds:
        for lr in p.lrs:
            for model in sizes:
                if model not in BUILTIN_SIZES and seed != p.seeds[0]:
                    continue  # real checkpoints: one seed (CPU time)
                if model == "medium" and seed not in p.seeds[:2]:
                    continue  # ~3.5 min a run: two seeds
                add("size_lr", model=model, lr=lr, seed=seed)
            for opt in OPTIMIZERS:
                add("optimizer", optimizer=opt, lr=lr, seed=seed)
            for phase in PHASES:
                add("task", phase=phase, lr=lr, seed=seed)
            add("precision", precision="bf16", lr=lr, seed=seed)
            add("precision", precision="fp32", lr=lr, seed=seed)
        for opt in OPTIMIZERS:
            add("optimizer_customary", optimizer=opt, lr=CUSTOMARY_LR[opt], seed=seed)
        for phase in PHASES:
            add("task_customary", phase=phase, lr=CUSTOMARY_LR[phase], seed=seed)
        for reward in REWARDS:
            add("reward", reward=reward, seed=seed)
    h_lr = CUSTOMARY_LR["rl"]
    per_kind = kind_density_override("tiny", 0.01)
    for seed in p.hyp_seeds:
        for density in (0.01, 0.1):
            tag = f"{density:.0%}"
            add("h1", optimizer="aspg", lr=h_lr, seed=seed, steps=p.hyp_steps, variant=f"aspg-{tag}",
                extra=(f"density={density}",))
            add("h1", optimizer="aspg", lr=h_lr, seed=seed, steps=p.hyp_steps, variant=f"randomk-{tag}",
                extra=(f"density={density}", "aspg.importance=random"))
        add("h1", optimizer="adamw", lr=h_lr, seed=seed, steps=p.hyp_steps, variant="dense")
        # the importance rule: ASPG's default ranks by |residual x EMA(grad)|; this ranks by |residual|
        add("h1", optimizer="aspg", lr=h_lr, seed=seed, steps=p.hyp_steps, variant="magnitude-1%",
            extra=("density=0.01", "aspg.importance=magnitude"))
        add("h3", optimizer="aspg", lr=h_lr, seed=seed, steps=p.hyp_steps, variant="global-1%", extra=("density=0.01",))
        add("h3", optimizer="aspg", lr=h_lr, seed=seed, steps=p.hyp_steps, variant="per-tensor-1%",
            extra=("density=0.01", "aspg.budget=per_tensor"))
        add("h3", optimizer="aspg", lr=h_lr, seed=seed, steps=p.hyp_steps, variant="per-kind-1%",
            extra=("density=0.01", per_kind))
    return list(specs.values()), notes


# ------------------------------------------------------------------------------ running

def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one core per run; parallelism comes from --jobs


def run_one(spec: RunSpec, run_dir: Path, preset_name: str) -> dict:
    """One run in this process; returns {name, ok, wall_s, error}."""
    from ..rl.trainer import TrainConfig, Trainer

    t0 = time.perf_counter()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "spec.json").write_text(json.dumps({**spec.__dict__, "name": spec.name, "preset": preset_name}, indent=2))
        cfg = TrainConfig.from_args([*COMMON, *spec.overrides(run_dir, PRESETS[preset_name])])
        trainer = Trainer(cfg)
        try:
            trainer.train()
        finally:
            trainer.close()
        return {"name": spec.name, "ok": True, "wall_s": time.perf_counter() - t0}
    except Exception as e:  # one failed run must not stop the matrix; it is reported
        (run_dir / "error.txt").write_text(traceback.format_exc())
        return {"name": spec.name, "ok": False, "wall_s": time.perf_counter() - t0, "error": f"{type(e).__name__}: {e}"}


def run_matrix(preset_name: str, out: Path, jobs: int, limit: int | None = None) -> list[dict]:
    specs, notes = build_matrix(preset_name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "matrix.json").write_text(json.dumps({"preset": preset_name, "notes": notes,
                                                 "runs": [{**s.__dict__, "name": s.name} for s in specs]}, indent=2))
    # the expensive runs first, so the pool does not end on one long straggler
    cost = {"tiny": 1, "small": 3, "medium": 25, "gpt2": 60, "gpt2-medium": 200, "gpt2-large": 500}
    todo = [s for s in specs if not (out / "runs" / s.name / "summary.json").exists()]
    todo.sort(key=lambda s: -cost.get(s.model, 1) * s.steps)
    if limit is not None:
        todo = todo[:limit]
    print(f"matrix {preset_name}: {len(specs)} runs, {len(specs) - len(todo)} already done, {len(todo)} to run "
          f"with {jobs} job(s)", flush=True)
    for n in notes:
        print("note:", n, flush=True)
    results = []
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker) as pool:
        futures = {pool.submit(run_one, s, out / "runs" / s.name, preset_name): s for s in todo}
        for i, f in enumerate(as_completed(futures), 1):
            r = f.result()
            results.append(r)
            status = "ok" if r["ok"] else f"FAILED ({r['error']})"
            print(f"[{i}/{len(todo)} {time.perf_counter() - t0:6.0f}s] {r['name']}: {status} in {r['wall_s']:.0f}s", flush=True)
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="matrix size (default quick)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default runs/matrix-PRESET)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs at once (default: one per core)")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report from the runs present")
    p.add_argument("--limit", type=int, default=None, help="run at most this many pending runs (then report)")


def run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = args.out or Path(f"runs/matrix-{args.preset}")
    if args.jobs < 1:
        raise SystemExit("--jobs must be >= 1")
    failed = []
    if not args.report_only:
        failed = [r for r in run_matrix(args.preset, out, args.jobs, args.limit) if not r["ok"]]
    from .report import write_report

    path = write_report(out)
    print(f"report: {path}")
    if failed:
        print(f"{len(failed)} run(s) failed; see OUT/runs/<name>/error.txt:", *[r["name"] for r in failed], sep="\n  ")
    return 1 if failed else 0
