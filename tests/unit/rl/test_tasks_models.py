import random

import pytest
import torch

pytest.importorskip("transformers")

from sparsecomm.rl.losses import GRPOConfig, evaluate, grpo_loss, sft_loss  # noqa: E402
from sparsecomm.rl.models import ModelNotAvailable, build_model, char_tokenizer  # noqa: E402
from sparsecomm.rl.tasks import Addition, Countdown, Example, SortDigits, datasets, make_reward, make_task  # noqa: E402


def test_char_tokenizer_round_trips():
    tok = char_tokenizer()
    ids = tok("47+38=85", add_special_tokens=False)["input_ids"]
    assert len(ids) == 8 and tok.decode(ids).replace(" ", "") == "47+38=85"
    assert tok.eos_token_id != tok.pad_token_id


def test_tasks_verify_answers():
    rng = random.Random(0)
    for task in (Addition(2), SortDigits(4), Countdown(3)):
        ex = task.example(rng)
        assert task.correct(ex, ex.answer) and not task.correct(ex, ex.answer + "1")
    cd = Countdown(3)
    ex = Example("2,3,4 to 14=", "2+3*4", ((2, 3, 4), 14))
    assert cd.correct(ex, "3*4+2") and not cd.correct(ex, "3*4+2+0") and not cd.correct(ex, "__import__('os')")


def test_rewards():
    task, ex = Addition(2), Example("47+38=", "85")
    r = make_reward("default")
    assert r(task, ex, "85", True) == pytest.approx(1.1)
    assert 0 < r(task, ex, "84", True) < 1  # partial credit, below an exact answer
    assert make_reward("harmless")(task, ex, "8a", True) == 0.0
    assert make_reward("helpful")(task, ex, "85", False) == 0.0  # no <eos>
    with pytest.raises(ValueError):
        make_reward("kind")
    with pytest.raises(ValueError):
        make_task("chess")


def test_missing_model_is_a_clear_error_not_a_hang(tmp_path):
    with pytest.raises(ModelNotAvailable, match="nothing is downloaded"):
        build_model(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelNotAvailable):
        build_model("gpt2-this-does-not-exist")


def test_local_checkpoint_path_loads(tmp_path):
    tok = char_tokenizer()
    model, _ = build_model("tiny", tok)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again, tok2 = build_model(str(tmp_path / "m"))
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in model.parameters())


def test_sft_then_grpo_step_runs_and_learns_a_little():
    torch.manual_seed(0)
    tok = char_tokenizer()
    model, _ = build_model("tiny", tok)
    task = Addition(1)
    data = datasets(task, 0, 0, 500, 100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for step in range(60):
        loss = sft_loss(model, tok, data["sft"][(step * 16) % 480:(step * 16) % 480 + 16])
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < first * 0.7
    loss, m = grpo_loss(model, model, tok, task, data["rl"][:4], make_reward("default"), GRPOConfig(group_size=4, max_new_tokens=3),
                        torch.Generator().manual_seed(0))
    loss.backward()
    assert 0 <= m["train/reward"] <= 1.1 and m["train/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert 0 <= evaluate(model, tok, task, data["rl"][:20], 3) <= 1


def test_grpo_config_validation():
    with pytest.raises(ValueError):
        GRPOConfig(group_size=1)
