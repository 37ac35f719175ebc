"""Trainer features the research matrix and long runs rely on: measured phases, precision,
per-kind ASPG density, rank and hot-map tracking, checkpoints with exact resume, config checks."""
import json

import pytest
import torch

pytest.importorskip("transformers")
from sparsecomm.rl.trainer import TrainConfig, Trainer  # noqa: E402

BASE = ["--config", "launch/recipes/demo.yaml", "comm=local", "sft_steps=10", "rl_steps=8", "prompts_per_step=4",
        "grpo.group_size=4", "eval_size=10", "console_every=1000", "sft_batch=8",
        "device=cpu"]  # bit-exact resume is a CPU property (CUDA's embedding backward uses atomics)


def train(tmp_path, *overrides, name="run"):
    cfg = TrainConfig.from_args([*BASE, f"run_dir={tmp_path / name}", *overrides])
    t = Trainer(cfg)
    try:
        summary = t.train()
    finally:
        t.close()
    rows = [json.loads(line)["metrics"] for line in (tmp_path / name / "stats_rank0.jsonl").read_text().splitlines()]
    return t, summary, rows


@pytest.mark.parametrize("phase", ["sft", "pretrain"])
def test_measured_sft_and_pretrain_phases_are_tracked(tmp_path, phase):
    _, s, rows = train(tmp_path, f"phase={phase}", "optimizer=adamw", "rl_lr=1e-3")
    assert len(rows) == 8 and all(r["train/phase"] == phase and r["train/loss"] > 0 for r in rows)
    assert s["sparsity_fp32_exact"] < 0.5  # Adam at 1e-3 moves almost every fp32 weight


def test_pure_bf16_training_has_one_view(tmp_path):
    t, _, rows = train(tmp_path, "precision=bf16", "optimizer=adamw", "rl_lr=1e-5")
    assert all(p.dtype == torch.bfloat16 for p in t.model.parameters())
    # weights are bf16: the fp32-exact and bf16-view definitions coincide
    assert all(r["sparsity/fp32_exact/global"] == r["sparsity/bf16_view/global"] for r in rows)


def test_kind_density_gives_each_layer_kind_its_budget(tmp_path):
    _, _, rows = train(tmp_path, "optimizer=aspg", "density=0.01", "kind_density={norm: 1.0}", "per_param_stats=false")
    # norms are sent whole every step: with ASPG they change in full, the rest stays ~99% unchanged
    assert rows[-1]["sparsity/fp32_exact/kind/norm"] < 0.05
    assert rows[-1]["sparsity/fp32_exact/kind/mlp"] > 0.95
    with pytest.raises(ValueError, match="kind_density"):
        TrainConfig(optimizer="adamw", kind_density={"norm": 1.0})


def test_rank_and_hot_map_tracking(tmp_path):
    _, _, rows = train(tmp_path, "optimizer=adamw", "rank_every=4", "rank_stack=3", "hot_window=4", "rl_lr=1e-4")
    r4 = rows[3]
    assert r4["rank/stacked_bound_k"] == 3 and 1 <= r4["rank/stacked/energy99"] <= 3
    assert any(k.startswith("rank/grad/stable/") for k in r4)
    assert "hot/frac_changed_gt_half/global" in r4
    assert (tmp_path / "run" / "hot_maps_rank0.npz").exists()


@pytest.mark.parametrize("optimizer", ["aspg", "adamw"])
def test_resume_is_exact(tmp_path, optimizer):
    whole, _, rows_whole = train(tmp_path, f"optimizer={optimizer}", "checkpoint_every=4", name="whole")
    train(tmp_path, f"optimizer={optimizer}", "checkpoint_every=4", "rl_steps=4", name="cut")
    # a crash after step 4 may leave rows past the checkpoint: resume must drop and redo them
    path = tmp_path / "cut" / "stats_rank0.jsonl"
    path.write_text(path.read_text() + json.dumps({"step": 5, "metrics": {"train/reward": 99.0}}) + "\n")
    resumed, _, rows_resumed = train(tmp_path, f"optimizer={optimizer}", "checkpoint_every=4", "resume=true", name="cut")
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert [r["train/reward"] for r in rows_resumed] == [r["train/reward"] for r in rows_whole]


def test_resume_refuses_a_different_config(tmp_path):
    train(tmp_path, "checkpoint_every=4", name="a")
    with pytest.raises(ValueError, match="different config"):
        Trainer(TrainConfig.from_args([*BASE, f"run_dir={tmp_path / 'a'}", "resume=true", "density=0.1"]))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(TrainConfig.from_args([*BASE, f"run_dir={tmp_path / 'b'}", "resume=true"]))


def test_config_errors_name_the_problem():
    assert TrainConfig(rl_lr="1e-5").rl_lr == 1e-5  # YAML reads 1e-5 as a string
    for bad, match in [({"rl_lr": "fast"}, "rl_lr"), ({"phase": "dpo"}, "phase"), ({"precision": "fp8"}, "precision"),
                       ({"k_steps": [1]}, "k_steps")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad)


def test_lora_trains_only_the_adapters(tmp_path):
    pytest.importorskip("peft")
    t, _, rows = train(tmp_path, "optimizer=adamw", "lora_rank=4", "rl_lr=1e-3")
    trainable = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    numel = sum(p.numel() for p in t.model.parameters() if p.requires_grad)
    assert rows[-1]["comm/dense_equiv_bytes"] == 0 or numel < 20_000  # one process: nothing sent; adapters are small
    assert rows[-1]["sparsity/fp32_exact/global"] < 0.5  # the adapters it tracks move every step
