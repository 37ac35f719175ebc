"""EmulatedCluster.stop_processes ends what its processes started, too (no root needed: no namespaces here).

torchrun starts every worker in a session of its own; when torchrun does not finish its shutdown in time
(a loaded machine), killing its process group leaves the workers running. Here a parent that ignores
SIGTERM stands for that torchrun, and its child in a new session for a worker."""
import subprocess
import sys
import time

from sparsecomm.cluster.netns import EmulatedCluster, _alive, _process_tree, _stat

PARENT = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(60)
"""


def test_stop_processes_ends_a_worker_in_its_own_session():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = int(parent.stdout.readline())
    start = _stat(child)[2]
    try:
        assert {pid for pid, _ in _process_tree(parent.pid)} == {parent.pid, child}
        cluster = EmulatedCluster(1)  # never brought up: only its process bookkeeping is used
        cluster.procs.append(parent)
        t0 = time.monotonic()
        cluster.stop_processes(timeout_s=0.5)
        assert parent.poll() is not None and time.monotonic() - t0 < 10
        assert not _alive(child, start)  # the group kill alone would have left it (another session)
        assert cluster.procs == []
    finally:
        for pid in (parent.pid, child):
            if _stat(pid) is not None and _stat(pid)[0] != "Z":
                subprocess.run(["kill", "-9", str(pid)])
        parent.wait(timeout=10)


LATE = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(0.5)  # still starting its worker when the TERM comes (torchrun's race)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
print(child.pid, flush=True)
"""


def test_stop_processes_ends_a_worker_started_after_the_snapshot():
    """A parent that starts its worker (own session) after stop_processes looked at its tree, then exits
    without ending it: the worker inherited the cluster's tag in its environment, and that finds it."""
    cluster = EmulatedCluster(1)
    parent = subprocess.Popen([sys.executable, "-c", LATE], stdout=subprocess.PIPE, text=True, start_new_session=True,
                              env=cluster.process_env())
    cluster.procs.append(parent)
    child = None
    try:
        assert parent.stdout.readline().strip() == "ready"  # its TERM handler is in place
        cluster.stop_processes(timeout_s=5)
        child = int(parent.stdout.readline())
        assert parent.poll() is not None
        assert _stat(child) is None or _stat(child)[0] == "Z"  # gone (the tree snapshot never saw it)
    finally:
        if child is not None and _stat(child) is not None and _stat(child)[0] != "Z":
            subprocess.run(["kill", "-9", str(child)])
