"""End to end: launch/train.py in one process and under torchrun; every mode starts and trains.

Two-worker runs check more than bytes: the final weights of both ranks are equal tensor by tensor
(torch.equal: every replica applied the same aggregate; DESIGN.md's invariant), and the reward
moved (the policy was trained, not just communicated). The final weights come from the checkpoint
each rank writes at its last step (`checkpoint_every` = `rl_steps`).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
SMALL = ["sft_steps=150", "rl_steps=12", "prompts_per_step=4", "grpo.group_size=4", "grpo.max_new_tokens=3",
         "task_kwargs={digits: 1}", "eval_size=40", "console_every=100", "dense_baseline_every=4", "checkpoint_every=12",
         "device=cpu"]  # the gloo path, also on a GPU host (where device=auto would pick cuda:LOCAL_RANK)


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


def assert_replicas_identical(run_dir: Path, world: int = 2) -> None:
    """The final weights of every rank equal rank 0's, tensor by tensor, bit for bit."""
    import torch.distributed as dist

    # PowerSGDState's unpickling attaches the default process group: give it a one-rank one
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        states = [torch.load(run_dir / f"checkpoint_rank{r}.pt", map_location="cpu", weights_only=False)
                  for r in range(world)]
    finally:
        dist.destroy_process_group()
    first = states[0]["model"]
    for r, st in enumerate(states[1:], start=1):
        assert st["step"] == states[0]["step"]
        assert st["model"].keys() == first.keys()
        differ = [k for k in first if not torch.equal(first[k], st["model"][k])]
        assert not differ, f"rank {r} differs from rank 0 in {len(differ)} tensors, e.g. {differ[:3]}"


def assert_reward_moves(run_dir: Path, world: int = 2) -> None:
    """Every rank sampled rewards that changed over the run (a stuck or untrained policy would not)."""
    for r in range(world):
        rows = [json.loads(line)["metrics"] for line in (run_dir / f"stats_rank{r}.jsonl").read_text().splitlines()]
        rewards = [m["train/reward"] for m in rows]
        assert len(set(rewards)) > 1, f"rank {r}: reward never moved: {rewards}"


def test_single_process_rl_reward_rises(tmp_path):
    # the demo recipe in one process, dense AdamW, 200 RL steps (seeded: deterministic)
    run(["--config", "launch/recipes/demo.yaml", f"run_dir={tmp_path}", "comm=local", "optimizer=adamw", "rl_steps=200",
         "console_every=1000", "device=cpu"])
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["reward_last"] > s["reward_first"] + 0.02
    assert 0 <= s["sparsity_fp32_exact"] <= s["sparsity_bf16_view"] + 1e-9 <= 1 + 1e-9


@pytest.mark.distributed
def test_demo_two_workers_aspg_reward_rises_with_far_fewer_bytes(tmp_path):
    r = run(["--config", "launch/recipes/demo.yaml", f"run_dir={tmp_path}", "console_every=1000", "checkpoint_every=400", "device=cpu"],
            nproc=2)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["reward_last"] > s["reward_first"] + 0.02
    assert s["dense_equiv_bytes_total"] > 50 * s["sent_bytes_total"]
    assert_replicas_identical(tmp_path)
    assert s["runtime"]["device"] == "cpu" and s["runtime"]["backend"] == "gloo" and s["runtime"]["world_size"] == 2
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
    assert_replicas_identical(tmp_path)
    assert_reward_moves(tmp_path)
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
    assert_replicas_identical(tmp_path)
    assert_reward_moves(tmp_path)


@pytest.mark.parametrize("extra", [["lora_rank=4", "optimizer=adamw", "comm=ddp"], ["precision=bf16", "optimizer=aspg", "comm=aspg"]])
@pytest.mark.distributed
def test_two_workers_lora_and_bf16(tmp_path, extra):
    if "lora_rank=4" in extra:
        pytest.importorskip("peft")
    run([f"run_dir={tmp_path}", *SMALL, *extra], nproc=2)
    assert json.loads((tmp_path / "summary.json").read_text())["sent_bytes_total"] > 0
    assert_replicas_identical(tmp_path)
    assert_reward_moves(tmp_path)


def test_bad_config_is_a_clear_error(tmp_path):
    from sparsecomm.rl.trainer import TrainConfig  # still importable from its old home

    with pytest.raises(ValueError, match="comm must be"):
        TrainConfig.from_args(["comm=carrier-pigeon"])
    with pytest.raises(ValueError, match="unknown config key"):
        TrainConfig.from_args(["learning_rate=1"])
    with pytest.raises(ValueError, match="use optimizer=aspg"):
        TrainConfig.from_args(["comm=aspg", "optimizer=adamw"])


def test_cuda_without_cuda_fails_at_start_not_in_a_hang(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--config", "launch/recipes/demo.yaml",
                        f"run_dir={tmp_path}", "comm=local", "device=cuda"], env=env, capture_output=True, text=True,
                       timeout=120, cwd=str(ROOT))
    assert r.returncode == 2 and "cannot start" in r.stderr and "torch.cuda.is_available() is False" in r.stderr


@pytest.mark.distributed
def test_two_workers_with_a_gpu_backend_on_cpu_fail_at_start(tmp_path):
    # backend=nccl for CPU models: both ranks refuse before the rendezvous, so nothing waits for a peer
    args = [f"run_dir={tmp_path}", *SMALL, "comm=aspg", "optimizer=aspg", "device=cpu", "backend=nccl"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(29900 + os.getpid() % 90), str(ROOT / "launch/train.py"), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert r.returncode != 0 and "NCCL moves device memory only" in r.stdout + r.stderr


@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (one per rank)")
@pytest.mark.parametrize("mode", [["comm=aspg", "optimizer=aspg"], ["comm=hook", "optimizer=sgd", "rl_lr=0.01"]])
def test_two_workers_on_cuda_over_nccl(tmp_path, mode):
    run([f"run_dir={tmp_path}", *SMALL, "device=auto", *mode], nproc=2)  # auto: cuda:LOCAL_RANK, nccl
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["runtime"]["device"] == "cuda:0" and s["runtime"]["backend"] == "nccl"
    assert_replicas_identical(tmp_path)
    assert_reward_moves(tmp_path)
