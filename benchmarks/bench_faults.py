"""Chaos run: kill -9 of a trainer mid-exchange and of the coordinator mid-round in a 4-worker
coordinator run, and of one worker of a 2-worker torchrun run with checkpoints; then restart,
and report what resumed, from which version or step, how many steps were lost, and whether the
final weights of the survivors agree bit for bit (torch.equal on saved state dicts). Results are
written whether they pass or not (issue 15, item 5).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_faults.py            # ~2-3 min on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_faults.py --only worker_kill

Scenarios (loopback only, every process started here is ended here by its PID, every wait bounded):
  worker_kill       `sparsecomm coordinator` (quorum 0.75, deadline 1 s, heartbeat timeout 1.5 s)
                    + 4 trainers (tests/integration/coord_worker.py: ASPG + CoordinatorTransport,
                    weight decay on, a checkpoint after every step). Trainer t3 sends its push at
                    version K and hangs (`--pause-in-push-at`); it is kill -9'd mid-exchange. The
                    others go on by quorum + deadline; t3 restarts from its checkpoint and rejoins.
                    All 4 train until version V.
  coordinator_kill  the same 4 trainers (quorum 1, so each round is the same with or without the
                    crash) against a reference run; the coordinator is kill -9'd once its journal
                    reached version K and restarted on the same checkpoint dir + journal.
  torchrun_kill     `torchrun --nproc-per-node 2 launch/train.py` (tiny model, comm=aspg, gloo,
                    checkpoint_every=4); rank 1 is kill -9'd after the step-8 checkpoints, torchrun
                    tears the job down, and the job is started again with resume=true; compared
                    with an uninterrupted run.
Results: benchmarks/results/faults.md and faults.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout_s: float, what: str, every_s: float = 0.02):
    """Poll `pred` until it returns something truthy; TimeoutError after timeout_s (bounded waits only)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Procs:
    """Every process this benchmark starts; `end()` kills each one still running by its PID and reaps it."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list, log: Path) -> subprocess.Popen:
        with open(log, "a") as f:
            p = subprocess.Popen([str(c) for c in cmd], cwd=str(ROOT), env=ENV, stdout=f, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def end(self) -> None:
        for p in self.procs:
            for child in children(p.pid):  # torchrun's workers: by PID too
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if p.poll() is None:
                p.kill()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                pass


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


# ---------------------------------------------------------------------- coordinator runs
def start_coordinator(procs: Procs, port: int, d: Path, *args) -> subprocess.Popen:
    log = d / "coord.log"
    start = log.stat().st_size if log.exists() else 0  # a restart appends to the same log
    p = procs.start([sys.executable, "-m", "sparsecomm.cli", "coordinator", "--bind", f"tcp://127.0.0.1:{port}",
                     "--poll-ms", "10", "--checkpoint-dir", d / "ck", *args], log)
    wait_for(lambda: p.poll() is not None or "listening on" in log.read_text()[start:], 60, "the coordinator to listen")
    if p.poll() is not None:
        raise RuntimeError(f"coordinator exited: {log.read_text()[-2000:]}")
    return p


def start_trainer(procs: Procs, endpoint: str, d: Path, worker: str, until_version: int, *args) -> subprocess.Popen:
    return procs.start([sys.executable, "-m", "tests.integration.coord_worker", "--endpoint", endpoint, "--worker", worker,
                        "--until-version", until_version, "--out", d / f"{worker}.json", "--timeout-s", 5,
                        "--weight-decay", 0.1, "--ckpt", d / f"{worker}.ckpt", *args], d / f"{worker}.log")


def wait_exit(procs: list[subprocess.Popen], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    return [p.poll() for p in procs]


def stop_coordinator(p: subprocess.Popen) -> None:
    """SIGTERM: the coordinator closes its round loop and writes a final checkpoint (its weights)."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def journal_version(ck: Path) -> int:
    from sparsecomm.exchange.coordinator.checkpoint import read_journal

    try:
        return max((r["aggregate"].version for r in read_journal(ck)), default=0)
    except Exception:  # a record being appended right now: try again next poll
        return 0


def replicas(d: Path, workers, coord_weights: torch.Tensor | None) -> dict:
    """Do the trainers' final weights (and the coordinator's) agree bit for bit?"""
    ws = {w: torch.load(d / f"{w}.json.weights.pt") for w in workers}
    first = ws[workers[0]]
    trainers_equal = all(all(torch.equal(first[k], ws[w][k]) for k in first) for w in workers)
    flat = torch.cat([t.reshape(-1) for t in first.values()])
    out = {"trainers_bit_identical": trainers_equal,
           "coordinator_equals_trainers": coord_weights is not None and torch.equal(flat, coord_weights)}
    return {**out, "weights": ws}


def coordinator_checkpoint(d: Path) -> dict:
    return torch.load(d / "ck" / "coordinator.pt", weights_only=False)


def worker_kill(out: Path, until_version: int = 40, kill_at: int = 10, step_sleep_s: float = 0.2) -> dict:
    """kill -9 of trainer t3 mid-exchange (its push for version `kill_at` sent, the reply not read),
    restarted at once from its last checkpoint; steps are paced (`step_sleep_s`, standing in for
    compute) so the survivors are still training when it is back."""
    out.mkdir(parents=True, exist_ok=True)
    procs, port = Procs(), free_port()
    endpoint, workers = f"tcp://127.0.0.1:{port}", ["t0", "t1", "t2", "t3"]
    pace = ["--step-sleep-s", step_sleep_s]
    try:
        coord = start_coordinator(procs, port, out, "--min-trainers", 4, "--quorum", 0.75, "--deadline-s", 1.0,
                                  "--heartbeat-timeout-s", 1.5, "--checkpoint-every", 1000, "--retain", 256)
        ts = {w: start_trainer(procs, endpoint, out, w, until_version, *pace,
                               *(["--pause-in-push-at", kill_at, "--marker", out / "t3.marker"] if w == "t3" else []))
              for w in workers}
        # t3's replacement, started ahead and waiting for the kill: a restart costs a join, not an interpreter start
        spare = start_trainer(procs, endpoint, out, "t3", until_version, *pace, "--resume", "--wait-for", out / "t3.killed")
        wait_for(lambda: (out / "t3.marker").exists(), 120, "t3 to push at the kill version", every_s=0.01)
        time.sleep(0.1)  # the others push too: the round t3 is in may close, its reply never read
        os.kill(ts["t3"].pid, signal.SIGKILL)
        ts["t3"].wait(10)
        v_kill = journal_version(out / "ck")
        ck = torch.load(out / "t3.ckpt", weights_only=False)
        # restarted at once: while it loads and joins, the survivors go on - t3 is dropped after
        # the heartbeat timeout, rounds close by quorum + deadline - and it rejoins by snapshot
        (out / "t3.killed").touch()
        ts["t3"] = spare
        codes = wait_exit(list(ts.values()), 180)
        stop_coordinator(coord)
    finally:
        procs.end()
    cc = coordinator_checkpoint(out)
    res = replicas(out, workers, cc["weights"]) if all(c == 0 for c in codes) else {
        "trainers_bit_identical": False, "coordinator_equals_trainers": False}
    outs = {w: json.loads((out / f"{w}.json").read_text()) for w in workers if (out / f"{w}.json").exists()}
    aggs = {a["version"]: a for a in cc["retained"]}
    in_flight = aggs.get(ck["version"] + 1, {})
    missed = [v for v, a in sorted(aggs.items()) if "t3" not in a["contributors"] and v > ck["version"]]
    t3 = outs.get("t3", {})
    return {"scenario": "worker_kill", "exit_codes": codes, "killed": "t3", "kill_version": kill_at,
            "coordinator_version_at_kill": v_kill, "victim_checkpoint_step": ck["step"],
            "victim_checkpoint_version": ck["version"],
            "in_flight_delta_counted": "t3" in in_flight.get("contributors", ()),
            "rounds_without_victim": len(missed), "rounds_without_victim_versions": missed,
            "victim_rejoined_at_version": t3.get("joined_at_version"), "victim_rejoined_how": t3.get("joined"),
            "victim_resume": t3.get("resume"),
            "victim_steps_after_rejoin": t3["steps"] - ck["step"] if t3 else None,
            "final_versions": {w: o["version"] for w, o in outs.items()}, "final_coordinator_version": cc["version"],
            "steps": {w: o["steps"] for w, o in outs.items()},
            "trainers_bit_identical": res["trainers_bit_identical"],
            "coordinator_equals_trainers": res["coordinator_equals_trainers"],
            "hashes_agree": len({o["hash"] for o in outs.values()}) == 1 and len(outs) == 4}


def _coordinator_run(out: Path, until_version: int, kill_at: int | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    procs, port = Procs(), free_port()
    endpoint, workers = f"tcp://127.0.0.1:{port}", ["t0", "t1", "t2", "t3"]
    args = ["--min-trainers", 4, "--quorum", 1.0, "--deadline-s", 600, "--heartbeat-timeout-s", 30,
            "--checkpoint-every", 5]
    info: dict = {}
    try:
        coord = start_coordinator(procs, port, out, *args)
        ts = [start_trainer(procs, endpoint, out, w, until_version) for w in workers]
        if kill_at is not None:
            wait_for(lambda: journal_version(out / "ck") >= kill_at, 120, f"journal version {kill_at}", every_s=0.005)
            os.kill(coord.pid, signal.SIGKILL)
            coord.wait(10)
            info["journal_version_at_kill"] = journal_version(out / "ck")
            info["checkpoint_version_at_kill"] = coordinator_checkpoint(out)["version"]
            t0 = time.monotonic()
            coord = start_coordinator(procs, port, out, *args)
            info["restart_s"] = round(time.monotonic() - t0, 2)
            log = (out / "coord.log").read_text()
            m = re.search(r"replayed (\d+) journalled rounds: now version (\d+)", log)
            info["replayed_rounds"], info["resumed_at_version"] = (int(m[1]), int(m[2])) if m else (0, None)
        info["exit_codes"] = wait_exit(ts, 180)
        stop_coordinator(coord)
    finally:
        procs.end()
    cc = coordinator_checkpoint(out)
    outs = {w: json.loads((out / f"{w}.json").read_text()) for w in workers if (out / f"{w}.json").exists()}
    ok = all(c == 0 for c in info["exit_codes"])
    res = replicas(out, workers, cc["weights"]) if ok else {"trainers_bit_identical": False,
                                                               "coordinator_equals_trainers": False, "weights": None}
    return {**info, "outs": outs, "final_coordinator_version": cc["version"], "hash": cc["hash"], **res}


def coordinator_kill(out: Path, until_version: int = 14, kill_at: int = 7) -> dict:
    ref = _coordinator_run(out / "ref", until_version, None)
    crash = _coordinator_run(out / "crash", until_version, kill_at)
    same = (ref["weights"] is not None and crash["weights"] is not None
            and all(torch.equal(ref["weights"]["t0"][k], crash["weights"]["t0"][k]) for k in ref["weights"]["t0"]))
    steps = {w: o["steps"] for w, o in crash["outs"].items()}
    return {"scenario": "coordinator_kill", "exit_codes": crash["exit_codes"], "kill_at_journal_version": kill_at,
            "journal_version_at_kill": crash.get("journal_version_at_kill"),
            "checkpoint_version_at_kill": crash.get("checkpoint_version_at_kill"),
            "replayed_rounds": crash.get("replayed_rounds"), "resumed_at_version": crash.get("resumed_at_version"),
            "restart_s": crash.get("restart_s"), "final_coordinator_version": crash["final_coordinator_version"],
            "steps": steps, "rounds_lost": until_version - crash["final_coordinator_version"] if same else None,
            "trainers_bit_identical": crash["trainers_bit_identical"],
            "coordinator_equals_trainers": crash["coordinator_equals_trainers"],
            "equals_uninterrupted_run": same, "hash_equals_uninterrupted_run": ref["hash"] == crash["hash"]}


# ---------------------------------------------------------------------- torchrun
TRAIN_ARGS = ["model=tiny", "task=addition", "task_kwargs={digits: 1}", "sft_steps=5", "rl_steps=16", "prompts_per_step=4",
              "grpo.group_size=4", "grpo.max_new_tokens=3", "comm=aspg", "optimizer=aspg", "density=0.05",
              "eval_size=5", "console_every=100", "dense_baseline_every=0", "checkpoint_every=4", "device=cpu"]


def torchrun(procs: Procs, run_dir: Path, port: int, *extra) -> subprocess.Popen:
    return procs.start([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", 2, "--master-addr",
                        "127.0.0.1", "--master-port", port, ROOT / "launch/train.py", f"run_dir={run_dir}", *TRAIN_ARGS,
                        *extra], run_dir.parent / f"{run_dir.name}.log")


def ckpt_step(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["step"])
    except Exception:  # absent, or replaced while we read it
        return -1


def last_stats_step(run_dir: Path, rank: int) -> int:
    path = run_dir / f"stats_rank{rank}.jsonl"
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def final_models(run_dir: Path) -> list[dict]:
    return [torch.load(run_dir / f"checkpoint_rank{r}.pt", map_location="cpu", weights_only=False)["model"] for r in (0, 1)]


def models_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def rank_pid(torchrun_pid: int, rank: int) -> int | None:
    for c in children(torchrun_pid):
        try:
            env = Path(f"/proc/{c}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return c
    return None


def torchrun_kill(out: Path, kill_after_step: int = 8) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    procs, info = Procs(), {}
    ref_dir, run_dir = out / "ref", out / "crash"
    try:
        p = torchrun(procs, ref_dir, free_port())
        info["ref_exit"] = wait_exit([p], 240)[0]
        p = torchrun(procs, run_dir, free_port())
        ck = [run_dir / f"checkpoint_rank{r}.pt" for r in (0, 1)]
        wait_for(lambda: p.poll() is not None or all(ckpt_step(c) >= kill_after_step for c in ck), 240,
                 f"the step-{kill_after_step} checkpoints", every_s=0.02)
        victim = rank_pid(p.pid, 1)
        info["killed_before_end"] = p.poll() is None and victim is not None
        if victim is not None:
            os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()
        info["crash_exit"] = wait_exit([p], 120)[0]
        info["teardown_s"] = round(time.monotonic() - t_kill, 2)
        info["checkpoint_steps_at_kill"] = [ckpt_step(c) for c in ck]
        info["steps_reached_at_kill"] = [last_stats_step(run_dir, r) for r in (0, 1)]
        p = torchrun(procs, run_dir, free_port(), "resume=true")
        info["resume_exit"] = wait_exit([p], 240)[0]
    finally:
        procs.end()
    ok = info["ref_exit"] == 0 and info["resume_exit"] == 0
    ref, got = (final_models(ref_dir), final_models(run_dir)) if ok else (None, None)
    resumed_from = min(info["checkpoint_steps_at_kill"])
    return {"scenario": "torchrun_kill", **info, "resumed_from_step": resumed_from,
            "steps_lost": max(info["steps_reached_at_kill"]) - resumed_from,
            "final_step": last_stats_step(run_dir, 0),
            "trainers_bit_identical": ok and models_equal(got[0], got[1]),
            "equals_uninterrupted_run": ok and models_equal(got[0], ref[0]) and models_equal(got[1], ref[1])}


# ---------------------------------------------------------------------- report
def passed(r: dict) -> bool:
    if r["scenario"] == "worker_kill":
        sent_once = r["in_flight_delta_counted"] == bool((r["victim_resume"] or {}).get("counted_rounds"))
        return r["trainers_bit_identical"] and r["coordinator_equals_trainers"] and r["hashes_agree"] and sent_once
    if r["scenario"] == "coordinator_kill":
        return r["trainers_bit_identical"] and r["equals_uninterrupted_run"] and r["rounds_lost"] == 0
    return r["killed_before_end"] and r["trainers_bit_identical"] and r["equals_uninterrupted_run"]


def describe(r: dict) -> list:
    s = r["scenario"]
    if s == "worker_kill":
        resumes = (f"t3 from its step-{r['victim_checkpoint_step']} checkpoint (v{r['victim_checkpoint_version']}), "
                   f"rejoined by {r['victim_rejoined_how']} at v{r['victim_rejoined_at_version']}")
        counted = r["in_flight_delta_counted"]
        fixed = counted == bool((r["victim_resume"] or {}).get("counted_rounds"))  # the restart knew its fate
        fate = (("subtracted from the restored residual on resume (outbox): sent once" if fixed else
                 "still in the restored residual: sent twice") if counted else
                ("left in the restored residual: sent again, once" if fixed else "subtracted though never counted: lost"))
        lost = (f"t3: 1 local step (its in-flight delta was {'counted in' if counted else 'dropped from'} "
                f"v{r['victim_checkpoint_version'] + 1}, {fate}); "
                f"{r['rounds_without_victim']} rounds closed without t3; survivors lost 0")
        agree = f"4 trainers {'=' if r['trainers_bit_identical'] else '!='}; coordinator {'=' if r['coordinator_equals_trainers'] else '!='}"
    elif s == "coordinator_kill":
        resumes = (f"coordinator from checkpoint v{r['checkpoint_version_at_kill']} + {r['replayed_rounds']} journal "
                   f"rounds = v{r['resumed_at_version']} (killed at journal v{r['journal_version_at_kill']}); "
                   f"restart {r['restart_s']} s")
        lost = f"{r['rounds_lost']} rounds" if r["rounds_lost"] is not None else "unknown (differs from the uninterrupted run)"
        agree = (f"4 trainers {'=' if r['trainers_bit_identical'] else '!='}; uninterrupted run "
                 f"{'=' if r['equals_uninterrupted_run'] else '!='}; hash chain {'=' if r['hash_equals_uninterrupted_run'] else '!='}")
    else:
        resumes = (f"both ranks from the step-{r['resumed_from_step']} checkpoints (resume=true); torchrun tore down "
                   f"the job in {r['teardown_s']} s")
        lost = f"{r['steps_lost']} steps (reached {r['steps_reached_at_kill']}, recomputed)"
        agree = (f"rank 0 {'=' if r['trainers_bit_identical'] else '!='} rank 1; uninterrupted run "
                 f"{'=' if r['equals_uninterrupted_run'] else '!='}")
    return [s, resumes, lost, agree, "pass" if passed(r) else "FAIL"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("worker_kill", "coordinator_kill", "torchrun_kill"), action="append")
    ap.add_argument("--work-dir", default=None, help="where runs go (default: a fresh temporary directory)")
    a = ap.parse_args()
    import tempfile

    work = Path(a.work_dir or tempfile.mkdtemp(prefix="bench_faults_"))
    chosen = a.only or ["worker_kill", "coordinator_kill", "torchrun_kill"]
    fns = {"worker_kill": worker_kill, "coordinator_kill": coordinator_kill, "torchrun_kill": torchrun_kill}
    results = []
    for name in chosen:
        t0 = time.monotonic()
        try:
            r = fns[name](work / name)
        except Exception as e:  # a scenario that could not run is a result too
            r = {"scenario": name, "error": f"{type(e).__name__}: {e}"}
        r["wall_s"] = round(time.monotonic() - t0, 1)
        results.append(r)
        print(json.dumps(r, default=str), flush=True)
    rows = [describe(r) if "error" not in r else [r["scenario"], r["error"], "", "", "FAIL"] for r in results]
    md = ("Faults injected with `kill -9` into live runs (loopback, 127.0.0.1), then a restart. "
          "'agree' compares the final weights with torch.equal, tensor by tensor.\n\n"
          + table(["scenario", "what resumes, from where", "lost", "final weights agree", "result"], rows)
          + "\nRaw numbers per scenario are in faults.json. Wall time: "
          + ", ".join(f"{r['scenario']} {r['wall_s']} s" for r in results) + ".\n")
    print(write_results("faults", {"results": results}, md))


if __name__ == "__main__":
    main()
