"""Multi-node benchmark: 8 emulated hosts at 100 Mbit/s and 1 Gbit/s (issue 7). Root only.

Every host is a network namespace on a bridge, its link shaped by tbf (sparsecomm.cluster), and
every worker a real process on it. Two workloads, each with three communication modes:

  A. The real RL job (launch/train.py via `sparsecomm cluster run`, torchrun --nnodes 8, one
     process per host): the `small` model (0.8M parameters), short dense SFT warm start, then
     GRPO steps with
        dense        DDP's all-reduce + AdamW
        aspg         ASPG at 1%, torch.distributed sparse exchange (the switch's path: split at P=8)
        coordinator  ASPG at 1%, through `sparsecomm coordinator` on host 0
     Reported from the run's StepStats: median RL step time (slowest rank; steps after the first
     five), bytes each worker sent per step (encoded buffers; for DDP the ring all-reduce volume),
     and the dense all-reduce of the same parameters measured every 5 steps in the same run.
  B. A GPT-2-124M-sized update (124,439,808 fp32 values, 1%, bf16 values):
        dense / aspg  benchmarks/exchange_worker.py on 8 hosts: one whole exchange on the split sparse
                      all-reduce (select, encode, reduce-scatter, owner top-k, all-gather, decode,
                      apply) vs an all_reduce of the same tensor, same group
        coordinator   benchmarks/coordinator_worker.py: 8 trainers + the coordinator on a 9th host,
                      resparsified 1% bf16 aggregate; time from push to verified aggregate
     Every process of a configuration shares this machine's 2 cores: CPU phases are 4-8x slower
     than on real hosts with a core per rank, links are the real (shaped) bottleneck.

    python benchmarks/bench_multinode.py            # ~20 min, writes results/multinode.{md,json,png}
    python benchmarks/bench_multinode.py --quick    # 4 hosts, tiny model, 1 Gbit/s only (not written)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_coordinator  # noqa: E402
import bench_exchange  # noqa: E402
from common import RESULTS, figure_row, save_figure, table, write_results  # noqa: E402

from sparsecomm.cluster import EmulatedCluster, can_create_namespaces  # noqa: E402
from sparsecomm.cluster.cli import run_on_cluster  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODES = {"dense": ["comm=ddp", "optimizer=adamw"], "aspg": ["comm=aspg", "optimizer=aspg", "density=0.01"],
         "coordinator": ["optimizer=aspg", "density=0.01"]}  # comm=coordinator is added by run_on_cluster


def rl_run(rate: str, hosts: int, mode: str, model: str, steps: int, port: int) -> dict:
    tmp = Path(tempfile.mkdtemp())
    args = ["launch/train.py", "--config", str(ROOT / "launch/recipes/demo.yaml"), f"run_dir={tmp / 'run'}", f"model={model}",
            "sft_steps=10", f"rl_steps={steps}", "prompts_per_step=2", "grpo.group_size=4", "eval_size=10",
            "dense_baseline_every=5", "console_every=100000", *MODES[mode]]
    t0 = time.time()
    with EmulatedCluster(hosts, rate_mbit=float(rate)) as cluster:
        rc = run_on_cluster(cluster, args, mode="coordinator" if mode == "coordinator" else "torchrun", port=port,
                            log_dir=tmp / "logs", timeout_s=1800, coordinator_port=port + 1,
                            coordinator_metrics_port=port + 2, echo_host0=False)
    if rc:
        raise RuntimeError(f"RL run {rate} Mbit/s {mode} failed ({rc}); logs in {tmp / 'logs'}")
    ranks = [[json.loads(line)["metrics"] for line in f.read_text().splitlines()]
             for f in sorted((tmp / "run").glob("stats_rank*.jsonl"))]
    skip = 5  # the first steps include allocations and the dense/sparse path's first use
    step_s = [max(r[i]["timing/step_s"] for r in ranks) for i in range(skip, min(len(r) for r in ranks))]
    r0 = ranks[0][skip:]
    sent = [m["comm/sent_bytes"] for m in r0 if isinstance(m.get("comm/sent_bytes"), (int, float))]
    dense = [m["timing/dense_allreduce_s"] for r in ranks for m in r[skip:] if "timing/dense_allreduce_s" in m]
    row = {"workload": f"RL job, {model}", "link": f"{rate} Mbit/s", "hosts": hosts, "mode": mode,
           "step_s": statistics.median(step_s), "sent_bytes_per_step": statistics.mean(sent) if sent else float("nan"),
           "dense_equiv_bytes_per_step": r0[0]["comm/dense_equiv_bytes"],
           "dense_allreduce_s": statistics.median(dense) if dense else float("nan"),
           "numel": None, "wall_s": time.time() - t0}
    print(f"  RL {rate} Mbit/s {mode:11s}: step {row['step_s']:.3f} s, sent {row['sent_bytes_per_step'] / 1e3:.1f} kB/step "
          f"(dense {row['dense_equiv_bytes_per_step'] / 1e3:.1f} kB), measured dense all-reduce {row['dense_allreduce_s']:.3f} s",
          flush=True)
    return row


def update_runs(rate: str, hosts: int, numel: int, port: int) -> list[dict]:
    rows = bench_exchange.run_config(rate, hosts, [numel], [0.01], reps=2, paths=("split",))
    dense = next(r for r in rows if r["case"] == "dense_allreduce")
    aspg = next(r for r in rows if r["case"] == "sparse_exchange")
    coord = bench_coordinator.run_config(rate, hosts, numel, "resparsify", rounds=2, port=port)
    base = {"workload": "124M update" if numel > 10**8 else f"{numel:,} update", "link": f"{rate} Mbit/s", "hosts": hosts,
            "numel": numel, "dense_equiv_bytes_per_step": dense["wire_bytes_per_worker"], "dense_allreduce_s": dense["time_s"]}
    return [{**base, "mode": "dense", "step_s": dense["time_s"], "sent_bytes_per_step": dense["wire_bytes_per_worker"]},
            {**base, "mode": "aspg", "step_s": aspg["time_s"], "sent_bytes_per_step": aspg["wire_bytes_per_worker"],
             "path": aspg["path"]},
            {**base, "mode": "coordinator", "step_s": coord["round_s"], "sent_bytes_per_step": coord["payload_bytes"],
             "note": "9th host runs the coordinator; time = push to verified aggregate"}]


def render(rows: list[dict]) -> str:
    md = ["Per configuration: the slowest rank's time per step (RL job: median over RL steps 6..N; update: one "
          "whole exchange, or one coordinator round), bytes each worker sent per step (encoded buffers; DDP and "
          "dense: the ring all-reduce volume 2 (P-1)/P x 4 B x N), and the speed-up against the dense mode's step "
          "on the same links. `dense all-reduce s` is the all_reduce of the same tensors measured in that run. "
          "Coordinator mode: `sent` counts each trainer's pushes; the coordinator's own link carries all P pushes in and "
          "P aggregates out (RL job: the coordinator shares host 0 with rank 0; 124M update: it has a 9th host). "
          "All processes of a configuration share this machine's 2 cores, so CPU phases (selection, coding, the RL "
          "step itself) are several times slower than with a core per rank: see results/exchange.md for the phase "
          "breakdown.\n\n"]
    out = []
    for r in rows:
        d = next(x for x in rows if x["workload"] == r["workload"] and x["link"] == r["link"] and x["mode"] == "dense")
        out.append([r["workload"], r["link"], r["hosts"], r["mode"], f"{r['step_s']:.3f}", f"{d['step_s'] / r['step_s']:.2f}",
                    f"{r['sent_bytes_per_step'] / 1e6:.3f}", f"{r['dense_equiv_bytes_per_step'] / r['sent_bytes_per_step']:.0f}",
                    f"{r['dense_allreduce_s']:.3f}"])
    md.append(table(["workload", "link", "hosts", "mode", "step s", "x vs dense", "MB sent/worker/step", "x fewer bytes",
                     "dense all-reduce s"], out))
    return "".join(md)


def plot(rows: list[dict], path: Path) -> None:
    groups = sorted({(r["workload"], r["link"]) for r in rows})
    fig, axes = figure_row(len(groups))
    for ax, (w, link) in zip(axes, groups):
        sub = [r for r in rows if r["workload"] == w and r["link"] == link]
        ax.bar([r["mode"] for r in sub], [r["step_s"] for r in sub], color=["0.5", "C0", "C1"][:len(sub)])
        ax.set_title(f"{w}\n{link}", fontsize=9)
        ax.set_ylabel("s per step (slowest rank)")
    save_figure(fig, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["rl", "update"], default=None)
    ap.add_argument("--render", action="store_true", help="rewrite results/multinode.{md,png} from results/multinode.json")
    a = ap.parse_args()
    if a.render:
        rows = json.loads((RESULTS / "multinode.json").read_text())["rows"]
        plot(rows, RESULTS / "multinode.png")
        md_path = RESULTS / "multinode.md"
        head = md_path.read_text().split("\n\n", 2)  # keep the command / date / machine block
        md_path.write_text("\n\n".join(head[:2]) + "\n\n" + render(rows) + "\n![](multinode.png)\n")
        return 0
    ok, why = can_create_namespaces()
    if not ok:
        print(f"bench_multinode needs emulated hosts: {why}")
        return 2
    hosts, rates = (4, ["1000"]) if a.quick else (8, ["100", "1000"])
    model, steps = ("tiny", 12) if a.quick else ("small", 30)
    rows, port = [], 29800
    for rate in rates:
        if a.only != "update":
            for mode in MODES:
                port += 10
                rows.append(rl_run(rate, hosts, mode, model, steps, port))
        if a.only != "rl":
            port += 10
            rows += update_runs(rate, hosts, 4_000_000 if a.quick else bench_exchange.GPT2_124M, port)
    md = render(rows)
    print(md)
    if not a.quick:
        plot(rows, RESULTS / "multinode.png")
        write_results("multinode", {"rows": rows}, md + "\n![](multinode.png)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
