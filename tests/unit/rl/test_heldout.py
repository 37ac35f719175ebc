"""Held-out evaluation split (sparsecomm.rl.tasks), and the trainer's held-out eval, whole-run
update rank and token bound (sparsecomm.rl.trainer with heldout_fraction / whole_run_rank)."""
import json

import pytest

from sparsecomm.rl.tasks import datasets, heldout_set, is_heldout, make_task


@pytest.mark.parametrize("name,kw", [("addition", {"digits": 2}), ("sort", {"length": 4}), ("countdown", {"n": 3})])
def test_heldout_prompts_never_appear_in_any_training_split(name, kw):
    task = make_task(name, **kw)
    evals = heldout_set(task, seed=10**6, n=100, fraction=0.1)
    assert len({e.prompt for e in evals}) == 100 and all(is_heldout(e.prompt, 0.1) for e in evals)
    train = {e.prompt for rank in range(4) for split in datasets(task, seed=rank * 1000, n_pretrain=500, n_sft=500,
                                                                 n_rl=500, heldout_fraction=0.1).values() for e in split}
    assert not train & {e.prompt for e in evals}
    # without the split the same eval prompts do show up in training: the test can fail
    plain = {e.prompt for split in datasets(task, seed=0, n_pretrain=2000, n_sft=2000, n_rl=2000).values() for e in split}
    assert name == "countdown" or plain & {e.prompt for e in evals}


def test_the_split_is_about_the_asked_fraction_and_refuses_too_small_tasks():
    task = make_task("addition", digits=2)
    prompts = {task.example(__import__("random").Random(i)).prompt for i in range(3000)}
    frac = sum(is_heldout(p, 0.2) for p in prompts) / len(prompts)
    assert 0.16 < frac < 0.24
    with pytest.raises(ValueError, match="distinct held-out prompts"):
        heldout_set(make_task("addition", digits=1), seed=0, n=50, fraction=0.1, max_draws=20_000)  # 100 problems in all
    with pytest.raises(ValueError, match="heldout_fraction"):
        heldout_set(task, seed=0, n=5, fraction=0.0)


def test_trainer_evaluates_on_heldout_prompts_and_records_whole_run_rank(tmp_path):
    pytest.importorskip("transformers")
    from sparsecomm.rl.trainer import TrainConfig, Trainer

    cfg = TrainConfig.from_args(["--config", "launch/recipes/demo.yaml", "comm=local", "sft_steps=5", "rl_steps=4",
                                 "prompts_per_step=2", "grpo.group_size=2", "eval_size=8", "console_every=1000",
                                 "sft_batch=4", "device=cpu", "task_kwargs={digits: 2}", "grpo.max_new_tokens=4",
                                 "heldout_fraction=0.2", "whole_run_rank=true", "rank_every=2", "rank_stack=2",
                                 f"run_dir={tmp_path}"])
    t = Trainer(cfg)
    try:
        s = t.train()
    finally:
        t.close()
    assert all(is_heldout(e.prompt, 0.2) for e in t.eval_set) and s["eval_heldout_fraction"] == 0.2
    assert not {e.prompt for e in t.eval_set} & {e.prompt for split in t.data.values() for e in split}
    rows = [json.loads(line)["metrics"] for line in (tmp_path / "stats_rank0.jsonl").read_text().splitlines()]
    tokens = [r["train/batch_tokens"] for r in rows]
    # 2 prompts x 2 samples x (6 prompt chars + 1..5 completion tokens)
    assert all(2 * 2 * 7 <= x <= 2 * 2 * 10 for x in tokens)
    w = s["whole_run_rank"]
    assert w["rank/whole_run/tokens"] == sum(round(x) for x in tokens)
    mats = [k.rsplit("/", 1)[1] for k in w if k.startswith("rank/whole_run/stable/")]
    assert mats and all(w[f"rank/whole_run/bound_tokens/{m}"] <= w[f"rank/whole_run/bound_min_mn/{m}"] for m in mats)
    assert any(w[f"rank/whole_run/stable/{m}"] > 0 for m in mats)  # the run moved the weights
    assert any(k.startswith("rank/grad/bound_tokens/") for r in rows for k in r)  # per-step bound beside the rank
