"""TRL's GRPOTrainer with sparsecomm: the callback's trackers, ASPG as the Trainer's optimizer, and under
torchrun the sparse DDP hook or ASPG's own exchange (DDP's all-reduce turned off). Offline, CPU, tiny model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests/integration/trl_grpo_worker.py"


def run(comm, out, nproc=1):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                                                    str(nproc), "--master-addr", "127.0.0.1", "--master-port",
                                                    str(29300 + os.getpid() % 300)]
    r = subprocess.run([*launcher, str(WORKER), comm, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads((out / f"r{i}.json").read_text()) for i in range(nproc)]


def test_grpo_trainer_single_process_with_aspg_and_trackers(tmp_path):
    (res,) = run("aspg", tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "stats" / "stats_rank0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    m = res["last"]
    # one process: ASPG still selects and "exchanges" its 5% through the local transport
    assert m["comm/path"] == "allgather" and m["comm/density"] == pytest.approx(0.05, rel=0.01)
    assert 0.9 <= m["sparsity/fp32_exact/global"] <= 1.0  # ASPG applies ~5% of the entries per step
    assert "train/reward" in m


@pytest.mark.distributed
@pytest.mark.parametrize("comm", ["aspg", "hook"])
def test_grpo_trainer_under_torchrun(tmp_path, comm):
    res = run(comm, tmp_path, nproc=2)
    replicas = [torch.load(tmp_path / f"r{i}.pt") for i in range(2)]
    assert replicas[0].keys() == replicas[1].keys() and replicas[0]
    for name, w in replicas[0].items():  # replicas identical, bit for bit, tensor by tensor
        assert torch.equal(w, replicas[1][name]), name
    m = res[0]["last"]
    assert m["comm/path"] == "allgather" and 0 < m["comm/sent_bytes"] < m["comm/dense_equiv_bytes"] / 20
    assert m["sparsity/fp32_exact/global"] < 1.0  # the weights moved
