"""Coordinator benchmark: rounds/s and bytes/s with 2-16 trainer processes (issue 5).

Each configuration starts a real `sparsecomm coordinator` process and P trainer processes
(benchmarks/coordinator_worker.py) that push a GPT-2-124M-sized delta at 1% density (bf16
values, Rice indices) every round and apply the verified aggregate. Two aggregate modes:
`exact` (the mean over the union of indices, fp32 values: grows with P) and `resparsify` (top-k
of the mean at 1% with coordinator-side error feedback, bf16: constant size). Reported: round
time as the trainers see it (push to verified aggregate), rounds/s, bytes in/out of the
coordinator per round (scraped from its Prometheus endpoint), and the coordinator's resident
memory after every round (from /proc), to show it stays bounded. Loopback, and emulated hosts
at 1 Gbit/s when root.

    python benchmarks/bench_coordinator.py           # ~10 min, writes results/coordinator.*
    python benchmarks/bench_coordinator.py --quick   # 1M values, P = 2, 4
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_results  # noqa: E402

from sparsecomm.cluster import EmulatedCluster, can_create_namespaces  # noqa: E402

HERE = Path(__file__).resolve().parent
GPT2_124M = 124_439_808


def rss_gib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("sparsecomm_coordinator_") and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def run_config(link: str, P: int, numel: int, mode: str, rounds: int, port: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    tmp = Path(tempfile.mkdtemp())
    coord_args = ["--deadline-s", "600", "--heartbeat-timeout-s", "600", "--max-frame-bytes", str(2 << 30),
                  "--metrics-port", str(port + 1), "--retain", "4"]
    if mode == "resparsify":
        coord_args += ["--resparsify-density", "0.01", "--value-codec", "bf16"]
    cluster = EmulatedCluster(P + 1, rate_mbit=float(link)).up() if link != "loopback" else None
    try:
        host = cluster.addresses[0] if cluster else "127.0.0.1"
        bind = f"tcp://{host}:{port}"
        cmd = [sys.executable, "-m", "sparsecomm.cli", "coordinator", "--bind", bind, *coord_args,
               *(["--insecure"] if cluster else [])]  # emulated links: private to this machine
        if cluster:  # metrics of a namespaced coordinator are read from inside its namespace
            cmd[cmd.index("--metrics-port") + 1] = str(port + 1)
        coord = cluster.popen(0, cmd, env=env) if cluster else subprocess.Popen(cmd, env=env, start_new_session=True)
        time.sleep(2.0)
        workers = []
        for r in range(P):
            wcmd = [sys.executable, str(HERE / "coordinator_worker.py"), "--endpoint", bind, "--worker", f"t{r}",
                    "--numel", str(numel), "--rounds", str(rounds), "--seed", str(r), "--out", str(tmp / f"{r}.json")]
            workers.append(cluster.popen(r + 1, wcmd, env=env) if cluster else subprocess.Popen(wcmd, env=env))
        rss = []
        while any(w.poll() is None for w in workers):
            if any(w.poll() not in (None, 0) for w in workers):  # a dead trainer would stall every round: stop now
                for w in workers:
                    if w.poll() is None:
                        w.kill()
                raise RuntimeError(f"{link} P={P} {mode}: a worker failed (exit codes {[w.poll() for w in workers]})")
            rss.append(rss_gib(coord.pid))  # `ip netns exec` execs in place: the pid is the coordinator's
            time.sleep(0.5)
        metrics = scrape(port + 1) if not cluster else _scrape_in_ns(cluster, port + 1)
    finally:
        if cluster:
            cluster.down()
        else:
            coord.terminate()
            coord.wait(30)
    res = [json.loads((tmp / f"{r}.json").read_text()) for r in range(P)]
    per_round = [max(w["rows"][i]["round_s"] for w in res) for i in range(rounds)]
    steady = per_round[1:] or per_round  # round 0 includes the first aggregate's allocations
    agg_bytes = res[0]["rows"][-1]["recv_bytes"]
    row = {"link": link if link == "loopback" else f"{link} Mbit/s", "P": P, "numel": numel, "mode": mode,
           "round_s": min(steady), "rounds_per_s": 1 / min(steady), "payload_bytes": res[0]["payload_bytes"],
           "aggregate_bytes_per_worker": agg_bytes, "aggregate_k": res[0]["rows"][-1]["aggregate_k"],
           "rounds": rounds,
           "coordinator_in_bytes_total": metrics.get("sparsecomm_coordinator_received_bytes_total", 0),
           "coordinator_out_bytes_total": metrics.get("sparsecomm_coordinator_sent_bytes_total", 0),
           "coordinator_rss_gib_max": max(rss) if rss else float("nan"),
           "coordinator_rss_gib_last": rss[-1] if rss else float("nan"),
           "coordinator_round_latency_s": metrics.get("sparsecomm_coordinator_round_seconds_sum", 0) / max(1, metrics.get("sparsecomm_coordinator_round_seconds_count", 1))}
    print(f"  {row['link']} P={P} {mode}: {row['round_s']:.2f} s/round, aggregate {agg_bytes / 1e6:.1f} MB/worker, "
          f"coordinator RSS max {row['coordinator_rss_gib_max']:.2f} GiB", flush=True)
    return row


def _scrape_in_ns(cluster, port) -> dict:
    p = cluster.popen(0, [sys.executable, "-c", f"import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics',timeout=5).read().decode())"],
                      stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=30)
    res = {}
    for line in out.splitlines():
        if line.startswith("sparsecomm_coordinator_"):
            name, value = line.rsplit(" ", 1)
            res[name] = float(value)
    return res


def render(rows: list[dict], ok: bool, why: str, quick: bool) -> list[str]:
    md = ["Round time: push to verified aggregate, max over trainers, best steady round (after the first). "
          "Deltas: 1% of the size, bf16 values, Rice indices. `exact`: mean over the union, fp32 (grows with P); "
          "`resparsify`: top-k 1% of the mean with coordinator error feedback, bf16 (constant). Per-round traffic "
          "through the coordinator = P x push in, P x aggregate out (the encoded buffers, headers included); the "
          "Prometheus totals also count the one-time seeding of the weights at join (0.5 GB) and snapshots. "
          "RSS of the coordinator from /proc while it ran.\n\n",
          table(["link", "P", "mode", "s/round", "rounds/s", "push B/worker", "aggregate B/worker", "coord in MB/round",
                 "coord out MB/round", "coord out MB/s", "Prometheus in/out MB (incl. join)", "coord RSS max GiB",
                 "RSS at end GiB"],
                [[r["link"], r["P"], r["mode"], f"{r['round_s']:.2f}", f"{r['rounds_per_s']:.2f}", f"{r['payload_bytes']:,}",
                  f"{r['aggregate_bytes_per_worker']:,}", f"{r['P'] * r['payload_bytes'] / 1e6:.1f}",
                  f"{r['P'] * r['aggregate_bytes_per_worker'] / 1e6:.1f}",
                  f"{r['P'] * r['aggregate_bytes_per_worker'] / r['round_s'] / 1e6:.0f}",
                  f"{r['coordinator_in_bytes_total'] / 1e6:.0f} / {r['coordinator_out_bytes_total'] / 1e6:.0f}",
                  f"{r['coordinator_rss_gib_max']:.2f}", f"{r['coordinator_rss_gib_last']:.2f}"] for r in rows])]
    if not ok:
        md.append(f"\nEmulated hosts skipped: {why}.\n")
    if not quick:
        md.append("\nNot run: `exact` with 16 trainers (a 16-way union at 1% is ~15% dense in fp32: ~90 MB to each "
                  "of 16 workers per round, ~1.4 GB/round through one 2-core coordinator).\n")
    return md


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--render", action="store_true", help="rebuild results/coordinator.md from results/coordinator.json")
    a = ap.parse_args()
    ok, why = can_create_namespaces()
    if a.render:
        from common import RESULTS

        data = json.loads((RESULTS / "coordinator.json").read_text())
        md = render(data["rows"], ok, why, False)
        head = (RESULTS / "coordinator.md").read_text().split("\n\n", 1)[0]  # title, command, date, machine as measured
        body = (RESULTS / "coordinator.md").read_text().split("\n\n")[1]
        (RESULTS / "coordinator.md").write_text(head + "\n\n" + body + "\n\n" + "".join(md))
        print("re-rendered", RESULTS / "coordinator.md")
        return 0
    if a.quick:
        plan = [("loopback", P, 1_000_000, mode, 3) for P in (2, 4) for mode in ("exact", "resparsify")]
    else:
        plan = [("loopback", P, GPT2_124M, mode, 3) for P in (2, 4, 8, 16) for mode in ("resparsify", "exact")
                if not (mode == "exact" and P == 16)]
        if ok:
            plan += [("1000", P, GPT2_124M, "resparsify", 3) for P in (4, 8)]
    rows = []
    port = 31000
    for cfg in plan:
        port += 10
        rows.append(run_config(*cfg, port=port))
    md = render(rows, ok, why, a.quick)
    print("".join(md))
    if not a.quick:
        print("wrote", write_results("coordinator", {"rows": rows}, "".join(md)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
