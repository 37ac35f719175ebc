"""End to end: launch/train.py in one process and under torchrun; every mode starts and trains."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
SMALL = ["sft_steps=150", "rl_steps=12", "prompts_per_step=4", "grpo.group_size=4", "grpo.max_new_tokens=3",
         "task_kwargs={digits: 1}", "eval_size=40", "console_every=100", "dense_baseline_every=4"]


def run(args, nproc=1, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "launch/train.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
               "--master-port", str(29400 + os.getpid() % 500), str(ROOT / "launch/train.py"), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_single_process_rl_reward_rises(tmp_path):
    # the demo recipe in one process, dense AdamW, 200 RL steps (seeded: deterministic)
    run(["--config", "launch/recipes/demo.yaml", f"run_dir={tmp_path}", "comm=local", "optimizer=adamw", "rl_steps=200",
         "console_every=1000"])
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["reward_last"] > s["reward_first"] + 0.02
    assert 0 <= s["sparsity_fp32_exact"] <= s["sparsity_bf16_view"] + 1e-9 <= 1 + 1e-9


@pytest.mark.distributed
def test_demo_two_workers_aspg_reward_rises_with_far_fewer_bytes(tmp_path):
    r = run(["--config", "launch/recipes/demo.yaml", f"run_dir={tmp_path}", "console_every=1000"], nproc=2)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["reward_last"] > s["reward_first"] + 0.02
    assert s["dense_equiv_bytes_total"] > 50 * s["sent_bytes_total"]
    assert "bf16 view" in r.stdout and "x fewer" in r.stdout and "dense all_reduce" in r.stdout


@pytest.mark.distributed
@pytest.mark.parametrize("mode", [["comm=aspg", "optimizer=aspg"], ["comm=ddp", "optimizer=adamw"],
                                  ["comm=hook", "optimizer=sgd", "rl_lr=0.01"], ["comm=powersgd", "optimizer=adafactor"]])
def test_two_workers_under_torchrun(tmp_path, mode):
    run([f"run_dir={tmp_path}", *SMALL, *mode], nproc=2)
    s = json.loads((tmp_path / "summary.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "stats_rank1.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and rows[-1]["world_size"] == 2
    assert s["dense_equiv_bytes_total"] > 0
    if "comm=aspg" in mode:
        assert s["sent_bytes_total"] < s["dense_equiv_bytes_total"] / 10
        assert any("timing/dense_allreduce_s" in r["metrics"] for r in rows)


@pytest.mark.distributed
def test_two_workers_through_the_coordinator(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    coord = subprocess.Popen([sys.executable, "-m", "sparsecomm.cli", "coordinator", "--bind", f"tcp://127.0.0.1:{port}",
                              "--min-trainers", "2", "--max-seconds", "300"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        run([f"run_dir={tmp_path}", *SMALL, "comm=coordinator", f"coordinator=tcp://127.0.0.1:{port}"], nproc=2)
    finally:
        coord.terminate()
        coord.wait(timeout=30)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert 0 < s["sent_bytes_total"] < s["dense_equiv_bytes_total"] / 10


@pytest.mark.parametrize("extra", [["lora_rank=4", "optimizer=adamw", "comm=ddp"], ["precision=bf16", "optimizer=aspg", "comm=aspg"]])
@pytest.mark.distributed
def test_two_workers_lora_and_bf16(tmp_path, extra):
    if "lora_rank=4" in extra:
        pytest.importorskip("peft")
    run([f"run_dir={tmp_path}", *SMALL, *extra], nproc=2)
    assert json.loads((tmp_path / "summary.json").read_text())["sent_bytes_total"] > 0


def test_bad_config_is_a_clear_error(tmp_path):
    from sparsecomm.rl.trainer import TrainConfig

    with pytest.raises(ValueError, match="comm must be"):
        TrainConfig.from_args(["comm=carrier-pigeon"])
    with pytest.raises(ValueError, match="unknown config key"):
        TrainConfig.from_args(["learning_rate=1"])
    with pytest.raises(ValueError, match="use optimizer=aspg"):
        TrainConfig.from_args(["comm=aspg", "optimizer=adamw"])
