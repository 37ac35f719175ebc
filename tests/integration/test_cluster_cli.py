"""`sparsecomm cluster`: torchrun and the coordinator mode across emulated hosts; up/status/down;
everything removed after Ctrl-C. Root only (network namespaces); CI is root."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparsecomm.cluster import can_create_namespaces

OK, WHY = can_create_namespaces()
pytestmark = [pytest.mark.root, pytest.mark.skipif(not OK, reason=f"network namespaces unavailable: {WHY}")]
ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["launch/train.py", "--config", "launch/recipes/demo.yaml", "sft_steps=20", "rl_steps=6", "prompts_per_step=4",
         "grpo.group_size=4", "eval_size=20", "console_every=100"]


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def cluster(*args, env=None, timeout=300):
    cmd = [sys.executable, "-m", "sparsecomm.cli", "cluster", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT),
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.parametrize("mode,rdzv", [("torchrun", "static"), ("coordinator", "c10d")])
def test_run_across_four_hosts(tmp_path, mode, rdzv):
    before = namespaces()
    r = cluster("run", "--hosts", "4", "--rate-mbit", "1000", "--mode", mode, "--rdzv", rdzv, "--port", "29561",
                "--log-dir", str(tmp_path / "logs"), "--", *TRAIN, f"run_dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert namespaces() == before
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["sent_bytes_total"] > 0 and s["sent_bytes_total"] < s["dense_equiv_bytes_total"] / 20
    assert {p.name for p in (tmp_path / "run").glob("stats_rank*.jsonl")} == {f"stats_rank{i}.jsonl" for i in range(4)}
    assert "4 worker(s)" in r.stdout and f"over {'coordinator' if mode == 'coordinator' else 'aspg'}" in r.stdout
    if mode == "coordinator":
        assert "listening on tcp://10.213." in (tmp_path / "logs" / "coordinator.log").read_text()


def test_up_status_down(tmp_path):
    before = namespaces()
    env = {"SPARSECOMM_STATE_DIR": str(tmp_path)}
    r = cluster("up", "--hosts", "2", "--rate-mbit", "100", env=env)
    assert r.returncode == 0, r.stderr
    tag = r.stdout.split(":")[0]
    assert len(namespaces() - before) == 3  # survives the command that made it
    assert f"{tag}: 2 hosts, 100.0 Mbit/s" in cluster("status", env=env).stdout
    r = cluster("run", "--tag", tag, "--log-dir", str(tmp_path / "logs"), "--", str(ROOT / "tests/integration/rank_probe.py"),
                str(tmp_path / "probe"), env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    probes = sorted(p.read_text().split() for p in (tmp_path / "probe").glob("*"))
    assert [p[:2] for p in probes] == [["0", "2"], ["1", "2"]]
    assert probes[0][2].startswith("10.213.") and probes[0][2].endswith(".1") and probes[1][2].endswith(".2")
    assert len(namespaces() - before) == 3  # --tag leaves the hosts up
    assert cluster("down", "--tag", tag, env=env).returncode == 0
    assert namespaces() == before and "no clusters" in cluster("status", env=env).stdout


def test_ctrl_c_removes_everything(tmp_path):
    before = namespaces()
    token = f"sleeper-{os.getpid()}"
    script = tmp_path / f"{token}.py"
    script.write_text("import time\nfor _ in range(600):\n    time.sleep(0.1)\n")
    p = subprocess.Popen([sys.executable, "-m", "sparsecomm.cli", "cluster", "run", "--hosts", "2", "--port", "29563",
                          "--log-dir", str(tmp_path / "logs"), "--", str(script)], cwd=str(ROOT),
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(200):  # wait until the sleepers run on both hosts
            if len(_pids_with(token)) >= 2:
                break
            time.sleep(0.1)
        assert len(namespaces() - before) == 3 and _pids_with(token)
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert namespaces() == before
    assert not _pids_with(token)


def _pids_with(token: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if token.encode() in (d / "cmdline").read_bytes() and int(d.name) != os.getpid():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def test_bad_arguments_are_clear_and_create_nothing(tmp_path):
    before = namespaces()
    for args, message in [(["run", "--hosts", "0", "--", "x.py"], "n_hosts must be in [1, 250]"),
                          (["run", "--hosts", "2"], "nothing to run"),
                          (["up", "--hosts", "2", "--rate-mbit", "-5"], "rate_mbit must be > 0")]:
        r = cluster(*args, env={"SPARSECOMM_STATE_DIR": str(tmp_path)})
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
    assert namespaces() == before
