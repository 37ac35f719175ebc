"""Merging by delta composition (issue 19): two single-task fine-tunes from one base, kept as
sparse delta files (`sparsecomm merge extract`), composed by sum / task arithmetic (ours) and
TIES / DARE (mergekit). Held-out accuracy per task for each single-task model and each merge;
support overlap and sign conflicts of the deltas (interference); file sizes against a dense delta.

Setup: tiny GPT-2 (char tokenizer, offline), base = a short central SFT on both tasks (1-digit
addition, 3-digit sort: low accuracy on both); each fine-tune = `--ft-steps` more SFT steps
(sparsecomm.rl.losses.sft_loss, AdamW) on one task from that base, written with save_pretrained.
Deltas are extracted whole (every changed entry) and as per-tensor top-k at 10% and 1%.
Held-out metric: greedy exact-match accuracy on 128 prompts per task.

Target (issue 19): some merge keeps >= 90% of each single-task model's held-out accuracy on the pair.

    python benchmarks/bench_merge.py                 # ~2 min on 2 cores
    python benchmarks/bench_merge.py --base-steps 150 --ft-steps 100 --lr 1e-3 --name merge_gentle
                                                     # a stronger base and smaller fine-tuning steps
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, rewrite_markdown, table, write_results  # noqa: E402

from sparsecomm import merge as M  # noqa: E402
from sparsecomm.rl.losses import evaluate, sft_loss  # noqa: E402
from sparsecomm.rl.models import build_model, char_tokenizer  # noqa: E402
from sparsecomm.rl.tasks import datasets, make_task  # noqa: E402

TASK_KW = {"addition": {"digits": 1}, "sort": {"length": 3}}
KEEP = 0.9


def sft(model, tok, data, steps: int, lr: float, seed: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    for _ in range(steps):
        loss = sft_loss(model, tok, rng.sample(data, 32))
        opt.zero_grad()
        loss.backward()
        opt.step()


def accuracy(ckpt: Path, heldout: dict) -> dict[str, float]:
    model, tok = build_model(str(ckpt))
    return {t: evaluate(model, tok, make_task(t, **TASK_KW[t]), exs, 4) for t, exs in heldout.items()}


def why(acc: dict, overlap: dict, ok: bool) -> str:
    """The measured reasons, in words: forgetting of the other task, overlap and sign conflicts, sparse deltas alone."""
    a, b = TASK_KW
    lines = [f"Reading ({'PASS' if ok else 'FAIL'}), from the numbers above: each fine-tune moves every weight "
             f"(whole-delta Jaccard {overlap['1']['jaccard']:.2f}) and the two deltas disagree in sign on "
             f"{overlap['1']['sign_conflict_fraction']:.0%} of the entries (50% would be unrelated directions)."]
    lines.append(f"Each single-task model also forgets the other task: {a} fine-tune scores {acc[a][b]:.2f} on {b} "
                 f"(base {acc['base'][b]:.2f}), {b} fine-tune {acc[b][a]:.2f} on {a} (base {acc['base'][a]:.2f}): in this "
                 "0.1M-parameter model the tasks compete for the same weights, which leaves a merge little room to keep both.")
    lines.append(f"Sparse deltas overlap little (Jaccard {overlap['0.1']['jaccard']:.3f} at 10%, {overlap['0.01']['jaccard']:.3f} "
                 f"at 1%); applied alone, a top-10% delta scores {acc[f'{a} (top-10% delta alone)'][a]:.2f} on {a} (full "
                 f"fine-tune {acc[a][a]:.2f}, base {acc['base'][a]:.2f}) and {acc[f'{b} (top-10% delta alone)'][b]:.2f} on {b} "
                 f"(full {acc[b][b]:.2f}, base {acc['base'][b]:.2f}): the part of the gain a sparse support keeps.")
    return " ".join(lines)


def render(data: dict) -> str:
    """The results markdown below write_results' header, from the run's data (also the JSON, for --render)."""
    args, acc, merges, overlap, files = (data[k] for k in ("args", "accuracy", "merges", "overlap", "files"))
    dense_delta_bytes, ok = data["dense_delta_bytes"], data["pass"]
    rows = [[name, *(f"{a[t]:.3f}" for t in TASK_KW)] for name, a in acc.items()]
    rows += [[name, *(f"{m['accuracy'][t]:.3f} ({m['kept'][t]:.0%})" for t in TASK_KW)] for name, m in merges.items()]
    return (f"Tiny GPT-2 ({dense_delta_bytes // 4} parameters); base: {args['base_steps']} SFT steps on both tasks; fine-tunes: "
            f"{args['ft_steps']} SFT steps on one task each (AdamW, lr {args['lr']}); seed {args['seed']}; 128 held-out prompts "
            "per task, greedy exact match.\n\n"
            f"**Target** (>= {KEEP:.0%} of each single-task model's accuracy on both tasks, by one merge): "
            f"{'PASS' if ok else 'FAIL'} ({', '.join(n for n, m in merges.items() if m['pass']) or 'no merge'})\n\n"
            "Held-out accuracy (in brackets: fraction of the single-task model's accuracy on that task):\n\n"
            + table(["model", *TASK_KW], rows)
            + "\n\nSupport overlap of the two deltas (per-tensor top-k at each density) and sign conflicts on the overlap:\n\n"
            + table(["density", "overlap entries", "union", "Jaccard", "sign conflicts on overlap"],
                    [[d, s["overlap"], s["union"], f"{s['jaccard']:.3f}", f"{s['sign_conflict_fraction']:.1%}"]
                     for d, s in overlap.items()])
            + "\n\nDelta file sizes (manifest + SPCD payload; fp32 values unless named) against a dense fp32 delta "
            f"({dense_delta_bytes} bytes):\n\n"
            + table(["delta", "density", "bytes", "vs dense"],
                    [[k, f"{v['density']:.4f}", v["bytes"], f"{v['vs_dense']:.3f}"] for k, v in files.items()])
            + "\n\n" + why(acc, overlap, ok) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-steps", type=int, default=60)
    p.add_argument("--ft-steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="merge")
    p.add_argument("--render", action="store_true", help="re-write the .md from the JSON (keeps its command and date)")
    args = p.parse_args()
    if args.render:
        data = json.loads((RESULTS / f"{args.name}.json").read_text())
        rewrite_markdown(args.name, data, render(data))
        return
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_merge_"))
    sets = {t: datasets(make_task(t, **kw), seed=args.seed + 50 + i, n_pretrain=0, n_sft=1000, n_rl=0)["sft"]
            for i, (t, kw) in enumerate(TASK_KW.items())}
    heldout = {t: datasets(make_task(t, **kw), seed=10**6 + i, n_pretrain=0, n_sft=0, n_rl=128)["rl"]
               for i, (t, kw) in enumerate(TASK_KW.items())}
    tok = char_tokenizer()
    model, _ = build_model("tiny", tok, seed=args.seed)
    sft(model, tok, sets["addition"] + sets["sort"], args.base_steps, args.lr, args.seed)
    model.save_pretrained(tmp / "base")
    tok.save_pretrained(tmp / "base")
    for t in TASK_KW:
        m, _ = build_model(str(tmp / "base"))
        sft(m, tok, sets[t], args.ft_steps, args.lr, args.seed + 1)
        m.save_pretrained(tmp / t)
        tok.save_pretrained(tmp / t)
    base = M.load_weights(tmp / "base")
    numel = sum(t.numel() for t in base.values())
    dense_delta_bytes = 4 * numel  # one fp32 value per parameter, no indices

    acc = {"base": accuracy(tmp / "base", heldout), **{t: accuracy(tmp / t, heldout) for t in TASK_KW}}
    files, overlap = {}, {}
    for dens in (1.0, 0.1, 0.01):
        for t in TASK_KW:
            f = tmp / f"{t}_{dens:g}.spd"
            man = M.save_delta(f, M.extract(base, M.load_weights(tmp / t), dens, "fp32"), base, "fp32", t)
            files[f"{t} @ {dens:g}"] = {"bytes": f.stat().st_size, "density": man["density"],
                                        "vs_dense": f.stat().st_size / dense_delta_bytes}
        if dens == 1.0:  # the same whole delta with bf16 values: size only (the merges use fp32)
            f = tmp / "size_bf16.spd"
            man = M.save_delta(f, M.extract(base, M.load_weights(tmp / "addition"), 1.0, "bf16"), base, "bf16")
            files["addition @ 1, bf16 values"] = {"bytes": f.stat().st_size, "density": man["density"],
                                                 "vs_dense": f.stat().st_size / dense_delta_bytes}
        a, b = (M.load_delta(tmp / f"{t}_{dens:g}.spd", base)[0] for t in TASK_KW)
        overlap[f"{dens:g}"] = M.support_stats(a, b)

    for dens in (0.1, 0.01):  # each task's sparse delta applied alone: what sparsifying costs before any merging
        for t in TASK_KW:
            out = M.merge(tmp / "base", [tmp / f"{t}_{dens:g}.spd"], "sum", tmp / f"single_{t}_{dens:g}")
            acc[f"{t} (top-{dens:.0%} delta alone)"] = accuracy(out, heldout)
    merges = {}
    pair = [tmp / f"{t}_1.spd" for t in TASK_KW]
    plan = [("sum", 1.0, dict()), ("task_arithmetic", 1.0, dict(weights=[0.5, 0.5])),
            ("task_arithmetic", 1.0, dict(weights=[0.7, 0.7])), ("ties", 1.0, dict(density=0.5)),
            ("ties", 1.0, dict(density=0.2)), ("dare_ties", 1.0, dict(density=0.5)),
            ("dare_linear", 1.0, dict(density=0.5, weights=[0.5, 0.5])),
            ("sum", 0.1, dict()), ("sum", 0.01, dict()), ("ties", 0.1, dict(density=0.5))]
    for method, dens, kw in plan:
        on = "whole deltas" if dens == 1.0 else f"top-{dens:.0%} deltas"
        label = f"{method} {kw.get('weights', '')} {('density ' + str(kw['density'])) if 'density' in kw else ''} on {on}"
        label = " ".join(label.split())
        deltas = [tmp / f"{t}_{dens:g}.spd" for t in TASK_KW] if dens != 1.0 else pair
        out = M.merge(tmp / "base", deltas, method, tmp / f"m{len(merges)}", **kw)
        a = accuracy(out, heldout)
        keep = {t: (a[t] / acc[t][t] if acc[t][t] else 0.0) for t in TASK_KW}
        merges[label] = {"accuracy": a, "kept": keep, "pass": all(v >= KEEP for v in keep.values())}
    ok = any(m["pass"] for m in merges.values())

    data = {"args": vars(args), "accuracy": acc, "merges": merges, "overlap": overlap, "files": files,
            "dense_delta_bytes": dense_delta_bytes, "pass": ok}
    md = render(data)
    write_results(args.name, data, md)
    print(md)


if __name__ == "__main__":
    main()
