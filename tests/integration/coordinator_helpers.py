"""Run a Coordinator in a background thread (its socket lives in that thread) and trainer processes."""
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from sparsecomm.exchange import Coordinator, CoordinatorConfig

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def running_coordinator(**cfg):
    cfg.setdefault("bind", "tcp://127.0.0.1:0")
    cfg.setdefault("poll_ms", 10)
    box, ready = {}, threading.Event()

    def serve():
        try:
            box["c"] = Coordinator(CoordinatorConfig(**cfg))
        except BaseException as e:  # surface construction errors in the test thread
            box["error"] = e
            ready.set()
            return
        ready.set()
        box["c"].serve()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert ready.wait(10)
    if "error" in box:
        raise box["error"]
    try:
        yield box["c"]
    finally:
        box["c"].stop = True
        t.join(10)
        assert not t.is_alive(), "coordinator did not stop"


def start_trainer(endpoint, worker, out, steps=5, die_after=-1, curve=None, timeout_s=30, adaptive=False):
    cmd = [sys.executable, "-m", "tests.integration.coord_worker", "--endpoint", endpoint, "--worker", worker,
           "--steps", str(steps), "--die-after", str(die_after), "--out", str(out), "--timeout-s", str(timeout_s)]
    if adaptive:
        cmd.append("--adaptive")
    if curve:
        cmd += ["--curve", *curve]
    return subprocess.Popen(cmd, cwd=str(ROOT), env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_all(procs, timeout=120):
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-3000:]


def weights_digest(coord) -> str:
    """Digest of the coordinator's weights in the trainers' parameter layout (same flat order)."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(coord.state.weights.numpy()).tobytes()).hexdigest()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def coordinator_process(port: int, log_path, *args, timeout_s: float = 60):
    """`sparsecomm coordinator` as a real process on 127.0.0.1:port (so it can be kill -9'd), its
    output in `log_path` (a file, so a chatty coordinator never blocks on a full pipe); yields
    the Popen once it listens; killed and reaped on exit."""
    import os
    import time

    cmd = [sys.executable, "-m", "sparsecomm.cli", "coordinator", "--bind", f"tcp://127.0.0.1:{port}", "--poll-ms", "10",
           *map(str, args)]
    start = Path(log_path).stat().st_size if Path(log_path).exists() else 0  # a restart appends to the same log
    with open(log_path, "a") as log:
        p = subprocess.Popen(cmd, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while "listening on" not in Path(log_path).read_text()[start:]:
            assert p.poll() is None and time.monotonic() < deadline, Path(log_path).read_text()[-3000:]
            time.sleep(0.05)
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(30)
