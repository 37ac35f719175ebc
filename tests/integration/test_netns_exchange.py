"""ASPG across 4 emulated hosts (network namespaces, 1 Gbit/s tbf links). Root only; CI is root."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsecomm.cluster import EmulatedCluster, can_create_namespaces

OK, WHY = can_create_namespaces()
pytestmark = [pytest.mark.root, pytest.mark.skipif(not OK, reason=f"network namespaces unavailable: {WHY}")]
ROOT = Path(__file__).resolve().parents[2]


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_aspg_on_four_emulated_hosts_keeps_replicas_identical(tmp_path):
    before = namespaces()
    env = {"PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1"}
    with EmulatedCluster(4, rate_mbit=1000) as cluster:
        assert len(namespaces() - before) == 5  # four hosts and the bridge
        procs = [cluster.popen(r, [sys.executable, "-m", "tests.integration.aspg_worker", "--rank", str(r), "--world", "4",
                                   "--master", cluster.addresses[0], "--port", "29555", "--out", str(tmp_path / f"{r}.json")],
                               env=env, cwd=str(ROOT))
                 for r in range(4)]
        for p in procs:
            assert p.wait(timeout=180) == 0
    assert namespaces() == before  # everything the cluster made is gone
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(4)]
    assert len({r["digest"] for r in results}) == 1  # bit-identical replicas across hosts
    m = results[0]["metrics"]
    assert m["comm/path"] == "split" and m["comm/sent_bytes"] < m["comm/dense_equiv_bytes"] / 20  # P=4: split
    assert m["timing/dense_allreduce_s"] > 0


def test_cluster_cleans_up_after_a_failure():
    before = namespaces()
    with pytest.raises(RuntimeError, match="boom"):
        with EmulatedCluster(2) as cluster:
            p = cluster.popen(0, ["sleep", "30"])
            raise RuntimeError("boom")
    assert p.poll() is not None  # the process it started was ended
    assert namespaces() == before


def test_bad_cluster_config():
    with pytest.raises(ValueError):
        EmulatedCluster(0)
    with pytest.raises(ValueError):
        EmulatedCluster(2, rate_mbit=-1)


@pytest.mark.skipif(os.geteuid() == 0, reason="checks the non-root message")
def test_non_root_reason():
    assert not can_create_namespaces()[0]
