"""Shared benchmark helpers: machine description, timing, results files."""
from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from sparsecomm.track.report import markdown_table as table  # noqa: F401  (the benchmarks' name)

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem_gib, 1), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "platform": platform.platform()}


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def best_time(fn, repeat: int = 3):
    """(best seconds, last result): the minimum is the least noisy estimate on a shared machine."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def figure_row(n: int, width: float = 3.4, height: float = 3.4):
    """One row of n panels on the Agg backend (no display needed): (figure, list of axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(name: str, data: dict, markdown: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    data = {"command": command_line(), "date": stamp, "machine": machine(), **data}
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    return rewrite_markdown(name, data, markdown)


def rewrite_markdown(name: str, data: dict, markdown: str) -> Path:
    """results/NAME.md: the command / date / machine block of `data` (a results JSON), then `markdown`
    (also what `--render` uses, so a re-rendered file keeps the run's provenance)."""
    m = data["machine"]
    head = (f"# {name}\n\nCommand: `{data['command']}`  \nDate: {data['date']}  \n"
            f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB, torch {m['torch']} "
            f"({m['torch_threads']} threads), Python {m['python']}\n\n")
    path = RESULTS / f"{name}.md"
    path.write_text(head + markdown)
    return path




def run_ranks(link: str, P: int, argv, timeout_s: int = 3600) -> None:
    """Start rank r as `argv(r, master_address)` for r < P: on loopback, or one per emulated host on a
    tbf-shaped bridge (link = rate in Mbit/s; sparsecomm.cluster, root only). Raises if a rank fails."""
    import subprocess

    from sparsecomm.cluster import EmulatedCluster

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    if link == "loopback":
        procs = [subprocess.Popen(argv(r, "127.0.0.1"), env={**env, "GLOO_SOCKET_IFNAME": "lo"}) for r in range(P)]
        try:
            for p in procs:
                p.wait(timeout=timeout_s)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    else:
        with EmulatedCluster(P, rate_mbit=float(link)) as cluster:
            procs = [cluster.popen(r, argv(r, cluster.addresses[0]), env={**env, **cluster.torchrun_env()})
                     for r in range(P)]
            for p in procs:
                p.wait(timeout=timeout_s)
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{link} P={P}: a rank failed (exit codes {[p.returncode for p in procs]})")


def run_demo_job(out: Path, seed: int, overrides: list[str], *, nproc: int = 2, port: int, what: str) -> dict:
    """One run of the demo job (launch/recipes/demo.yaml + overrides) under torchrun on loopback, as the
    convergence, held-out and scaling benchmarks run it: {"rows": rank 0's metrics per step, "summary",
    "sent_bytes" (summed comm/sent_bytes), "wall_s", "cpu_s" (all ranks' CPU seconds)}. `what` names the
    run in the error raised when it fails."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(port), str(root / "launch/train.py"), "--config", str(root / "launch/recipes/demo.yaml"),
           f"run_dir={out}", f"seed={seed}", "console_every=100000", *overrides]
    t0, c0 = time.perf_counter(), os.times()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    c1 = os.times()
    if r.returncode:
        raise RuntimeError(f"{what} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    rows = [json.loads(line)["metrics"] for line in (out / "stats_rank0.jsonl").read_text().splitlines()]
    sent = sum(m.get("comm/sent_bytes", 0) for m in rows if isinstance(m.get("comm/sent_bytes"), (int, float)))
    return {"rows": rows, "summary": json.loads((out / "summary.json").read_text()), "sent_bytes": sent,
            "wall_s": time.perf_counter() - t0,
            "cpu_s": (c1.children_user + c1.children_system) - (c0.children_user + c0.children_system)}
