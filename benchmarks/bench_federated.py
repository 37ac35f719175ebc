"""Federated RL benchmark (issue 19): 8 clients, IID vs non-IID, dense FedAvg vs sparse deltas at
10% / 1% / 0.1% up and down. Held-out accuracy per client task and global, bytes up and down per
round against dense FedAvg, rounds to a target.

Setup (all from sparsecomm): the tiny GPT-2 (0.1M parameters, char tokenizer) warm-started by a
short central dense SFT on both tasks (1-digit addition, 3-digit sort) so GRPO has a signal; then
`rounds` federated rounds, every client running `local_steps` local GRPO steps (Adam) per round.
Non-IID: each client has one task and a slice of leading digits (sparsecomm.federated.split);
IID: every client samples both tasks over all digits. Sparse runs: FedAvg of the uploaded top-k of
each client's model change with client-side error feedback, bf16 values, one flat tensor per
message; downlink re-sparsified at the same density with server-side error feedback. Dense FedAvg
moves whole fp32 models both ways (4 bytes per parameter per copy).

Held-out metric: greedy exact-match accuracy (the verifier's reward of the greedy completion:
1 exact, 0 otherwise), on 64 prompts per task over all digits ("global" = mean over tasks) and 64
prompts of each client's own distribution.

Pre-registered target (fixed before the run): non-IID, 1% up and down, mean final global accuracy
over seeds >= dense FedAvg's minus MARGIN = 0.05 absolute, with >= 100x fewer bytes per round
(up + down) than dense FedAvg. Rounds to target: first evaluated round at which a run reaches 90%
of dense FedAvg's final global accuracy in the same split (mean over seeds).

    python benchmarks/bench_federated.py                      # 2 splits x 4 methods x 3 seeds, 20 rounds (~7 min CPU)
    python benchmarks/bench_federated.py --seeds 0 --rounds 6 --name federated_quick
    python benchmarks/bench_federated.py --render             # re-write .md/.png from the JSON

The in-process loop (sparsecomm.federated.FedRun) runs the clients one after another; the same
parts carry the same bytes over Flower (sparsecomm.federated.flower, tested bit-exact against
this loop in tests/integration/test_federated.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import sft  # noqa: E402
from common import RESULTS, figure_row, rewrite_markdown, save_figure, table, write_results  # noqa: E402

from sparsecomm.federated import FedConfig, FedRun  # noqa: E402
from sparsecomm.federated.client import model_state  # noqa: E402
from sparsecomm.rl.models import build_model, char_tokenizer  # noqa: E402
from sparsecomm.rl.tasks import datasets, make_task  # noqa: E402

MARGIN = 0.05
TARGET_FRACTION = 0.9
METHODS = {"dense": None, "sparse-10%": 0.1, "sparse-1%": 0.01, "sparse-0.1%": 0.001}
TASK_KW = {"addition": {"digits": 1}, "sort": {"length": 3}}


def warm_start(seed: int, steps: int) -> dict:
    """Central dense SFT on both tasks (sparsecomm.rl.losses.sft_loss, AdamW): the shared base model."""
    tok = char_tokenizer()
    model, _ = build_model("tiny", tok, seed=seed)
    data = [e for i, (t, kw) in enumerate(TASK_KW.items())
            for e in datasets(make_task(t, **kw), seed=seed + 50 + i, n_pretrain=0, n_sft=1000, n_rl=0)["sft"]]
    sft(model, tok, data, steps, lr=3e-3, seed=seed)  # the merge benchmark's SFT loop (same sampling, same seed)
    return model_state(model)


def run_one(split: str, method: str, seed: int, base: dict, args) -> dict:
    density = METHODS[method]
    kw = dict(clients=8, rounds=args.rounds, local_steps=args.local_steps, local_lr=args.local_lr, prompts_per_step=4,
              grpo={"group_size": 8, "max_new_tokens": 4, "beta": 0.0}, split=split, tasks=tuple(TASK_KW),
              task_kwargs=TASK_KW, eval_size=64, seed=seed)
    if density is not None:
        kw.update(density_up=density, density_down=density, value_codec_up="bf16", value_codec_down="bf16")
    run = FedRun(FedConfig(**kw), base, dense=density is None)
    curve = [{"round": 0, **run.evaluate()}]
    up, down, t0 = [], [], time.process_time()
    for rnd in range(1, args.rounds + 1):
        rep = run.round(rnd)
        up.append(rep.bytes_up / max(1, len(rep.accepted)))
        down.append(rep.bytes_down / max(1, len(rep.accepted) + len(rep.missing)))
        if rnd % args.eval_every == 0 or rnd == args.rounds:
            curve.append({"round": rnd, **run.evaluate()})
    dense = run.server.dense_bytes
    # round 1 has no downlink in the sparse runs (clients start from the base): average downlinks over rounds >= 2
    down_avg = sum(down[1:]) / max(1, len(down) - 1) if density is not None else dense
    return {"split": split, "method": method, "seed": seed, "curve": curve, "cpu_s": time.process_time() - t0,
            "bytes_up_per_client_round": sum(up) / len(up), "bytes_down_per_client_round": down_avg,
            "dense_bytes_per_copy": dense}


def rounds_to(curve, target: float):
    return next((p["round"] for p in curve if p["global"] >= target), None)


def summarize(runs: list[dict]) -> dict:
    import statistics as st

    out = {}
    for split in ("iid", "noniid"):
        dense_final = [r["curve"][-1]["global"] for r in runs if r["split"] == split and r["method"] == "dense"]
        if not dense_final:
            continue
        target = TARGET_FRACTION * st.mean(dense_final)
        for method in METHODS:
            rs = [r for r in runs if r["split"] == split and r["method"] == method]
            if not rs:
                continue
            finals = [r["curve"][-1]["global"] for r in rs]
            last = rs[0]["curve"][-1]
            per_task = {k[5:]: st.mean(r["curve"][-1][k] for r in rs) for k in last if k.startswith("task/")}
            per_client = {k[7:]: st.mean(r["curve"][-1][k] for r in rs) for k in last if k.startswith("client/")}
            up = st.mean(r["bytes_up_per_client_round"] for r in rs)
            down = st.mean(r["bytes_down_per_client_round"] for r in rs)
            dense = rs[0]["dense_bytes_per_copy"]
            out[f"{split}/{method}"] = {
                "final_global_mean": st.mean(finals), "final_global_sd": st.stdev(finals) if len(finals) > 1 else 0.0,
                "start_global": st.mean(r["curve"][0]["global"] for r in rs), "per_task": per_task, "per_client": per_client,
                "bytes_up_per_client_round": up, "bytes_down_per_client_round": down,
                "reduction_vs_dense": 2 * dense / (up + down), "target": target,
                "rounds_to_target": [rounds_to(r["curve"], target) for r in rs], "seeds": len(rs)}
    return out


def verdict(summary: dict) -> tuple[bool | None, str]:
    d, s = summary.get("noniid/dense"), summary.get("noniid/sparse-1%")
    if d is None or s is None:
        return None, "not run"
    gap = s["final_global_mean"] - d["final_global_mean"]
    ok = gap >= -MARGIN and s["reduction_vs_dense"] >= 100
    return ok, (f"non-IID sparse-1% minus dense FedAvg: {gap:+.3f} (margin -{MARGIN}); bytes per round "
                f"{s['reduction_vs_dense']:.0f}x fewer (need >= 100x) -> {'PASS' if ok else 'FAIL'}")


def render(data: dict) -> str:
    """The results markdown (below write_results' header) and the figure."""
    summary = data["summary"]
    ok, line = verdict(summary)
    rows = []
    for key, s in summary.items():
        split, method = key.split("/")
        rows.append([split, method, f"{s['start_global']:.3f}", f"{s['final_global_mean']:.3f} ± {s['final_global_sd']:.3f}",
                     " / ".join(f"{t} {a:.2f}" for t, a in s["per_task"].items()),
                     f"{s['bytes_up_per_client_round']:.0f}", f"{s['bytes_down_per_client_round']:.0f}",
                     f"{s['reduction_vs_dense']:.1f}x", ", ".join(str(r) for r in s["rounds_to_target"])])
    client_rows = [[key.split("/")[0], key.split("/")[1]] + [f"{a:.2f}" for a in s["per_client"].values()]
                   for key, s in summary.items()]
    a = data["args"]
    md = (f"{a['clients']} clients, {a['rounds']} rounds, {a['local_steps']} local GRPO steps (Adam, lr {a['local_lr']}) per "
          f"round, seeds {a['seeds']}, warm start {a['warm_steps']} central SFT steps; tiny GPT-2 "
          f"({data['params']} parameters). In-process loop (clients one after another on one core); total CPU "
          f"{data['cpu_s']:.0f} s.\n\n"
          f"**Target** (pre-registered): {line}\n\n"
          "Held-out metric: greedy exact-match accuracy. Bytes: encoded SPCD messages (headers included) per "
          "participating client per round; dense FedAvg: 4 bytes per parameter each way. Reduction = (dense up + "
          "dense down) / (sparse up + sparse down). Rounds to target: first evaluated round reaching "
          f"{TARGET_FRACTION:.0%} of dense FedAvg's final global accuracy in that split (per seed; None: not reached).\n\n"
          + table(["split", "method", "global at round 0", "final global (mean ± sd)", "final per task", "up B/client/round",
                   "down B/client/round", "fewer bytes", "rounds to target"], rows)
          + "\n\nFinal held-out accuracy on each client's own distribution (mean over seeds):\n\n"
          + table(["split", "method"] + [f"client {c}" for c in range(a["clients"])], client_rows)
          + "\n\n![federated](federated.png)\n")
    fig, axes = figure_row(3, width=4.0)
    for ax, split in zip(axes[:2], ("iid", "noniid")):
        for method in METHODS:
            rs = [r for r in data["runs"] if r["split"] == split and r["method"] == method]
            if rs:
                xs = [p["round"] for p in rs[0]["curve"]]
                ys = [sum(r["curve"][i]["global"] for r in rs) / len(rs) for i in range(len(xs))]
                ax.plot(xs, ys, marker="o", ms=3, label=method)
        ax.set_title(f"{split}: held-out global accuracy")
        ax.set_xlabel("round")
        ax.legend(fontsize=7)
    s = [(k, v) for k, v in summary.items() if k.startswith("noniid/")]
    axes[2].bar([k.split("/")[1] for k, _ in s], [v["bytes_up_per_client_round"] + v["bytes_down_per_client_round"] for _, v in s])
    axes[2].set_yscale("log")
    axes[2].set_title("non-IID: bytes up+down per client-round")
    axes[2].tick_params(axis="x", labelsize=7)
    save_figure(fig, RESULTS / f"{data['name']}.png")
    return md.replace("federated.png", f"{data['name']}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--local-lr", type=float, default=1e-3)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--splits", default="iid,noniid")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--warm-steps", type=int, default=150)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--name", default="federated")
    p.add_argument("--render", action="store_true", help="re-write the .md and .png from the JSON")
    args = p.parse_args()
    if args.render:  # keeps the JSON's command, date and machine in the header
        data = json.loads((RESULTS / f"{args.name}.json").read_text())
        rewrite_markdown(args.name, data, render(data))
        return
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs, t0 = [], time.process_time()
    for seed in seeds:
        base = warm_start(seed, args.warm_steps)
        for split in args.splits.split(","):
            for method in args.methods.split(","):
                r = run_one(split, method, seed, base, args)
                print(f"seed {seed} {split:6s} {method:11s} global {r['curve'][0]['global']:.3f} -> {r['curve'][-1]['global']:.3f} "
                      f"up {r['bytes_up_per_client_round']:.0f} B down {r['bytes_down_per_client_round']:.0f} B ({r['cpu_s']:.0f} s)",
                      flush=True)
                runs.append(r)
    data = {"name": args.name, "args": {**vars(args), "clients": 8, "seeds": seeds}, "runs": runs, "summary": summarize(runs),
            "params": sum(t.numel() for t in base.values()), "cpu_s": time.process_time() - t0}
    write_results(args.name, data, render(data))
    print(verdict(data["summary"])[1])


if __name__ == "__main__":
    main()
