"""`sparsecomm cluster`: N emulated hosts (network namespaces, a bridge, tbf-shaped links) and
multi-node torchrun across them. Needs root.

    sparsecomm cluster run --hosts 8 --rate-mbit 100 -- launch/train.py --config launch/recipes/demo.yaml
    sparsecomm cluster run --hosts 4 --rate-mbit 1000 --mode coordinator -- launch/train.py --config CONFIG
    sparsecomm cluster up --hosts 4 --rate-mbit 1000        # prints the tag; the hosts stay up
    sparsecomm cluster run --tag TAG -- launch/train.py ...  # reuse them
    sparsecomm cluster status                                # clusters made by `up`
    sparsecomm cluster down --tag TAG                        # or --all

`run` starts one `torchrun --nnodes N --node-rank i` per host (static rendezvous on host 0:
`--master-addr <host 0> --master-port`, or `--rdzv c10d` with `--local-addr` and
`--rdzv-conf is_host=1|0`; GLOO_SOCKET_IFNAME=eth0 in both, see netns.py), waits
for all of them, and removes the cluster it made - also after a failure, a timeout or Ctrl-C.
`--mode coordinator` also starts `sparsecomm coordinator --insecure` on host 0 (the emulated
links are private to this machine; Prometheus on
--coordinator-metrics-port) and appends `comm=coordinator coordinator=tcp://<host 0>:PORT` to the
training arguments. Host 0's output goes to the terminal, every host's to --log-dir/host<i>.log.

`up` records its cluster in $SPARSECOMM_STATE_DIR (default /run/sparsecomm) so `down` removes
exactly the namespaces it made, and nothing else.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .netns import EmulatedCluster, can_create_namespaces

MODES = ("torchrun", "coordinator")


def state_dir() -> Path:
    return Path(os.environ.get("SPARSECOMM_STATE_DIR", "/run/sparsecomm"))


def save_state(cluster: EmulatedCluster) -> Path:
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{cluster.tag}.json"
    path.write_text(json.dumps({"tag": cluster.tag, "n_hosts": cluster.n_hosts, "rate_mbit": cluster.rate_mbit,
                                "subnet": cluster.subnet, "namespaces": [cluster.bridge_ns, *cluster.hosts],
                                "addresses": cluster.addresses}, indent=2))
    return path


def load_state(tag: str) -> EmulatedCluster:
    path = state_dir() / f"{tag}.json"
    if not path.exists():
        raise SystemExit(f"no cluster {tag!r} recorded in {state_dir()} (see `sparsecomm cluster status`)")
    s = json.loads(path.read_text())
    c = EmulatedCluster(s["n_hosts"], s["rate_mbit"], subnet=s["subnet"], tag=s["tag"])
    c.adopt(s["namespaces"])
    return c


def torchrun_cmd(cluster: EmulatedCluster, host: int, script_args: list[str], port: int, nproc: int, rdzv: str) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if rdzv == "static":
        cmd += cluster.torchrun_args(host, port, nproc)
    else:  # c10d: every namespace resolves the hostname to 127.0.0.1, so name the address and the store host
        cmd += ["--nnodes", str(cluster.n_hosts), "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"{cluster.addresses[0]}:{port}", "--rdzv-id", cluster.tag,
                "--local-addr", cluster.addresses[host], "--rdzv-conf", f"is_host={int(host == 0)}"]
    return cmd + script_args


def run_on_cluster(cluster: EmulatedCluster, script_args: list[str], mode: str = "torchrun", port: int = 29500,
                   nproc: int = 1, rdzv: str = "static", log_dir: Path | None = None, timeout_s: float = 3600,
                   coordinator_port: int = 5555, coordinator_metrics_port: int = 9400, coordinator_args=(),
                   echo_host0: bool = True) -> int:
    """Run the training script on every host of an up cluster; returns the worst exit code (124 on timeout).
    Processes are started in the cluster (ended by pid by cluster.down())."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not script_args:
        raise ValueError("nothing to run: give the training script and its arguments after --")
    env = {**cluster.torchrun_env(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH", "")]))}
    log_dir = Path(log_dir or "runs/cluster-logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = []
    args = list(script_args)
    coord = None
    if mode == "coordinator":
        endpoint = f"tcp://{cluster.addresses[0]}:{coordinator_port}"
        f = open(log_dir / "coordinator.log", "w")
        logs.append(f)
        coord = cluster.popen(0, [sys.executable, "-m", "sparsecomm.cli", "coordinator", "--bind", endpoint,
                                  "--min-trainers", str(cluster.n_hosts * nproc), "--metrics-port", str(coordinator_metrics_port),
                                  "--metrics-addr", "0.0.0.0", "--insecure", *coordinator_args],
                              env=env, stdout=f, stderr=subprocess.STDOUT)
        args += ["comm=coordinator", f"coordinator={endpoint}"]
    procs = []
    for h in range(cluster.n_hosts):
        f = open(log_dir / f"host{h}.log", "w")
        logs.append(f)
        out = None if (h == 0 and echo_host0) else f
        procs.append(cluster.popen(h, torchrun_cmd(cluster, h, args, port, nproc, rdzv), env=env, stdout=out,
                                   stderr=subprocess.STDOUT if out else None))
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs):
            if coord is not None and coord.poll() is not None:
                print(f"coordinator exited with {coord.returncode}; see {log_dir / 'coordinator.log'}", file=sys.stderr)
                return coord.returncode or 1
            if any(p.poll() not in (None, 0) for p in procs):  # one host failed: the others would hang in a collective
                time.sleep(2.0)
                break
            if time.monotonic() > deadline:
                print(f"timed out after {timeout_s:.0f} s", file=sys.stderr)
                return 124
            time.sleep(0.2)
        codes = [p.poll() for p in procs]
        bad = [(h, c) for h, c in enumerate(codes) if c not in (0, None)]
        if bad:
            print(f"hosts failed (host, exit code): {bad}; logs in {log_dir}", file=sys.stderr)
            return max(c for _, c in bad) or 1
        return 0
    finally:
        for f in logs:
            f.close()


# ------------------------------------------------------------------------------ CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = sub.add_parser("up", help="create N hosts and leave them up (prints the tag)")
    down = sub.add_parser("down", help="remove a cluster made by `up`")
    sub.add_parser("status", help="list clusters made by `up`")
    run = sub.add_parser("run", help="torchrun a script across N hosts (a new cluster, removed afterwards, or --tag)")
    for q in (up, run):
        q.add_argument("--hosts", type=int, default=4, help="number of hosts (default 4)")
        q.add_argument("--rate-mbit", type=float, default=None, help="shape every host link to this rate (default: unshaped)")
    down.add_argument("--tag", help="the cluster's tag (from `up` / `status`)")
    down.add_argument("--all", action="store_true", help="remove every cluster recorded by `up`")
    run.add_argument("--tag", default=None, help="run on a cluster made by `up` instead of a new one")
    run.add_argument("--mode", choices=MODES, default="torchrun", help="torchrun (default) or coordinator")
    run.add_argument("--nproc-per-node", type=int, default=1)
    run.add_argument("--port", type=int, default=29500, help="rendezvous port on host 0")
    run.add_argument("--rdzv", choices=("static", "c10d"), default="static", help="rendezvous form (default static)")
    run.add_argument("--coordinator-port", type=int, default=5555)
    run.add_argument("--coordinator-metrics-port", type=int, default=9400)
    run.add_argument("--log-dir", type=Path, default=Path("runs/cluster-logs"))
    run.add_argument("--timeout-s", type=float, default=3600)
    run.add_argument("script", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS...], e.g. -- launch/train.py --config C")


def run(args) -> int:
    if args.action == "status":
        d = state_dir()
        files = sorted(d.glob("*.json")) if d.exists() else []
        existing = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
        for f in files:
            s = json.loads(f.read_text())
            alive = sum(ns in existing for ns in s["namespaces"])
            print(f"{s['tag']}: {s['n_hosts']} hosts, {s['rate_mbit'] or 'unshaped'} Mbit/s, "
                  f"{', '.join(s['addresses'])} ({alive}/{len(s['namespaces'])} namespaces present)")
        if not files:
            print("no clusters")
        return 0
    ok, why = can_create_namespaces()
    if not ok:
        print(f"sparsecomm cluster: {why}", file=sys.stderr)
        return 2
    if args.action == "up":
        try:
            c = EmulatedCluster(args.hosts, args.rate_mbit)
        except ValueError as e:
            print(f"sparsecomm cluster up: {e}", file=sys.stderr)
            return 2
        c.up(persist=True)
        save_state(c)
        print(f"{c.tag}: {c.n_hosts} hosts {', '.join(c.addresses)}; namespaces {', '.join(c.hosts)}")
        return 0
    if args.action == "down":
        if not args.tag and not args.all:
            raise SystemExit("give --tag TAG or --all")
        tags = [f.stem for f in state_dir().glob("*.json")] if args.all else [args.tag]
        for tag in tags:
            load_state(tag).down()
            (state_dir() / f"{tag}.json").unlink(missing_ok=True)
            print(f"{tag}: removed")
        return 0
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not script:
        print("sparsecomm cluster run: nothing to run; give the script and its arguments after --", file=sys.stderr)
        return 2
    if args.tag:
        cluster, own = load_state(args.tag), False
    else:
        try:
            cluster = EmulatedCluster(args.hosts, args.rate_mbit)
        except ValueError as e:  # a bad --hosts / --rate-mbit: say which, create nothing
            print(f"sparsecomm cluster run: {e}", file=sys.stderr)
            return 2
        cluster, own = cluster.up(), True
    try:
        return run_on_cluster(cluster, script,
                              args.mode, args.port, args.nproc_per_node, args.rdzv, args.log_dir, args.timeout_s,
                              args.coordinator_port, args.coordinator_metrics_port)
    finally:
        if own:
            cluster.down()
        else:
            cluster.stop_processes()  # leave the hosts up, end what we started
