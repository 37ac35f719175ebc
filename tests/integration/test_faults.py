"""The smallest chaos scenario of benchmarks/bench_faults.py as a test: 4 ASPG trainers (weight
decay on) through a real `sparsecomm coordinator` process, one kill -9'd mid-exchange. The
survivors must go on (rounds close without it by quorum + deadline), the killed one rejoins from
its checkpoint, and at the end every trainer and the coordinator hold the same weights, bit for bit.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/integration/test_faults.py
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_faults  # noqa: E402

pytestmark = pytest.mark.distributed


def test_kill_9_of_a_coordinator_trainer_mid_exchange(tmp_path):
    r = bench_faults.worker_kill(tmp_path, until_version=24, kill_at=3, step_sleep_s=0.25)
    assert r["exit_codes"] == [0, 0, 0, 0], r
    # the round count advanced without the killed trainer; it rejoined while the others still trained
    assert r["victim_checkpoint_version"] == 3 and r["rounds_without_victim"] >= 1, r
    assert 3 < r["victim_rejoined_at_version"] < 24 and r["victim_steps_after_rejoin"] > 0, r
    # the restart knew what happened to its in-flight push (outbox + the coordinator's answer at
    # join): counted, it left the restored residual; not counted, it stayed there to go out again
    assert r["victim_resume"]["counted_rounds"] == ([3] if r["in_flight_delta_counted"] else []), r
    assert r["final_versions"] == {w: 24 for w in ("t0", "t1", "t2", "t3")} and r["final_coordinator_version"] == 24
    # every replica, and the coordinator's canonical copy (weight decay included), bit for bit
    assert r["trainers_bit_identical"] and r["coordinator_equals_trainers"] and r["hashes_agree"]
