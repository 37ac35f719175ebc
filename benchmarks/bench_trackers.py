"""Tracker overhead on a small GPT-2 training step, and the memory each snapshot mode costs (issue 3).

A GPT-2 built from a config (offline, random init: n_layer 4, n_head 4, n_embd 256, 128
positions, 512-token vocabulary; ~3.4M parameters) trains with AdamW on random tokens, batch
8 x 64. Median step time without trackers, then with SparsityTracker in each snapshot mode
(and with the hot-parameter map / k-step windows / rank tracking), interleaved so drift hits
every variant alike. Overhead = (median with - median without) / median without.

    python benchmarks/bench_trackers.py          # ~2 min, writes results/trackers.*
    python benchmarks/bench_trackers.py --quick  # fewer steps, not written
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_results  # noqa: E402

from sparsecomm.track import RankTracker, SparsityTracker  # noqa: E402

VARIANTS = {
    "none": None,
    "bf16": dict(mode="bf16", k_steps=()),
    "bf16, every 2nd step": dict(mode="bf16", k_steps=(), every=2),
    "bf16 + k-step 10": dict(mode="bf16", k_steps=(10,)),
    "fp32 (the plan's)": dict(mode="fp32", k_steps=()),
    "fp32 + k10/100 + hot map": dict(mode="fp32", k_steps=(10, 100), hot_window=20),
    "cpu": dict(mode="cpu", k_steps=()),
}


def build(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=4, n_head=4, n_embd=256, n_positions=128, vocab_size=512)
    return GPT2LMHeadModel(cfg)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 60; quick 10)")
    a = ap.parse_args()
    steps = a.steps or (10 if a.quick else 60)
    model = build()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 512, (8, 64), generator=g)

    def train_step():
        opt.zero_grad(set_to_none=True)
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()

    for _ in range(5):
        train_step()  # warm up allocator and kernels
    trackers = {name: (SparsityTracker(model, **kw) if kw else None) for name, kw in VARIANTS.items()}
    rank = RankTracker(model, every=1)
    times = {name: [] for name in VARIANTS}
    times["rank (every step; amortise by `every`)"] = []
    for _ in range(steps):
        for name, tr in trackers.items():  # interleaved: machine noise hits every variant alike
            t0 = time.perf_counter()
            train_step()
            if tr is not None:
                tr.step(lr=1e-4)
            times[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(input_ids=batch, labels=batch).loss.backward()
        rank.observe_gradients(step=1, tokens=batch.numel())
        opt.step()
        times["rank (every step; amortise by `every`)"].append(time.perf_counter() - t0)
    base = statistics.median(times["none"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        tr = trackers.get(name)
        mem = tr.snapshot_bytes + (2 * n_params if tr is not None and tr.hot is not None else 0) if tr else 0
        rows.append({"variant": name, "median_step_s": med, "overhead": med / base - 1, "extra_memory_bytes": mem,
                     "bytes_per_param": mem / n_params})
    md = [f"Model: GPT-2 from config (4 layers, 256 wide, {n_params:,} parameters), AdamW, batch 8 x 64, "
          f"{steps} interleaved steps per variant, median. `cpu` mode on a CPU model costs what `fp32` does.\n\n",
          table(["variant", "median step s", "overhead", "extra memory", "bytes / param"],
                [[r["variant"], f"{r['median_step_s']:.4f}", f"{r['overhead']:+.1%}",
                  f"{r['extra_memory_bytes'] / 2**20:.1f} MiB", f"{r['bytes_per_param']:.1f}"] for r in rows])]
    bf16 = next(r for r in rows if r["variant"] == "bf16")
    bf16_2 = next(r for r in rows if r["variant"] == "bf16, every 2nd step")
    target = ("bf16-snapshot tracker overhead <= 5% of a training step (every step measured)", bf16["overhead"] <= 0.05,
              f"{bf16['overhead']:+.1%}")
    also = ("same, measuring every 2nd step exactly (`every=2`)", bf16_2["overhead"] <= 0.05, f"{bf16_2['overhead']:+.1%}")
    md.append("\n## target\n\n" + table(["target", "measured", "result"],
                                          [[t[0], t[2], "PASS" if t[1] else "FAIL"] for t in (target, also)]))
    md.append("\nOverhead is measured inside the loop (the tracker reads every weight right after the optimizer wrote "
              "them); timed alone on this model the bf16 pass costs ~2-3 ms of a ~115 ms step. Noise between "
              "interleaved variants here is about +-1.5 points.\n")
    print("".join(md))
    if not a.quick:
        print("wrote", write_results("trackers", {"n_params": n_params, "rows": rows, "targets": [
            {"target": t[0], "pass": t[1], "measured": t[2]} for t in (target, also)]},
                                     "".join(md)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
