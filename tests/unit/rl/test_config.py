"""TrainConfig parsing (sparsecomm.rl.config): OmegaConf dotlist overrides, --config files merged
in order, unknown keys refused with their name, bad values refused with the reason, and
launch/train.py --help listing every field with its doc."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("omegaconf")
from sparsecomm.rl.config import TrainConfig, config_help, field_docs, split_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
DEMO = str(ROOT / "launch/recipes/demo.yaml")


def test_dotlist_overrides_are_typed():
    cfg = TrainConfig.from_args(["rl_steps=7", "rl_lr=1e-5", "resume=true", "k_steps=[5, 10]", "density=0.001",
                                 "grpo.group_size=4", "aspg.importance=magnitude", "kind_density={norm: 1.0}"])
    assert (cfg.rl_steps, cfg.rl_lr, cfg.resume, cfg.k_steps, cfg.density) == (7, 1e-5, True, [5, 10], 0.001)
    assert isinstance(cfg.rl_lr, float) and isinstance(cfg.rl_steps, int)
    assert cfg.grpo == {"group_size": 4} and cfg.aspg == {"importance": "magnitude"} and cfg.kind_density == {"norm": 1.0}
    assert type(cfg.grpo) is dict and type(cfg.k_steps) is list  # plain containers, not OmegaConf nodes


def test_config_file_then_overrides_later_wins(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("rl_steps: 5\ngrpo: {max_new_tokens: 4}\nrl_lr: 1e-4\n")
    cfg = TrainConfig.from_args(["--config", DEMO, "--config", str(extra), "grpo.group_size=2", "rl_steps=9"])
    assert cfg.rl_steps == 9 and cfg.rl_lr == 1e-4  # YAML's 1e-4 is a float, not a string
    assert cfg.comm == "aspg" and cfg.sft_steps == 150  # from the demo recipe
    # a mapping in a later file replaces the earlier one; a dotted key sets one entry of it
    assert cfg.grpo == {"max_new_tokens": 4, "group_size": 2}
    # --config anywhere on the line, as before
    assert TrainConfig.from_args(["rl_steps=3", "--config", DEMO]).rl_steps == 3


def test_a_whole_mapping_replaces_the_default():
    # the sort task takes `length`, not addition's default `digits`: a merge would break make_task
    cfg = TrainConfig.from_args(["task=sort", "task_kwargs={length: 3}"])
    assert cfg.task_kwargs == {"length": 3}
    assert TrainConfig.from_args(["task_kwargs.digits=1"]).task_kwargs == {"digits": 1}


def test_every_recipe_loads():
    for recipe in sorted((ROOT / "launch/recipes").glob("*.yaml")):
        TrainConfig.from_args(["--config", str(recipe)])


def test_unknown_key_is_refused_with_its_name(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'learning_rate'"):
        TrainConfig.from_args(["learning_rate=1"])
    with pytest.raises(ValueError, match="did you mean rl_steps"):
        TrainConfig.from_args(["rl_stepz=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("rl_steps: 3\nwarp_drive: true\n")
    with pytest.raises(ValueError, match=r"unknown config key 'warp_drive' in .*bad\.yaml"):
        TrainConfig.from_args(["--config", str(bad)])
    with pytest.raises(ValueError, match="grpo.*bogus"):
        TrainConfig.from_args(["grpo.bogus=1"])


@pytest.mark.parametrize("item, reason", [
    ("rl_lr=fast", r"rl_lr.*'fast'.*Float"),
    ("rl_steps=1.5", r"rl_steps.*Integer"),
    ("resume=maybe", r"resume.*not a valid bool"),
    ("k_steps=[a]", r"k_steps\[0\].*Integer"),
    ("grpo=3", r"grpo.*Cannot assign int"),
    ("comm=carrier-pigeon", "comm must be one of"),
    ("density=2", r"density must be in \(0, 1\]"),
    ("device=tpu", "device must be auto, cpu, cuda or cuda:N"),
    ("backend=mpi", "backend must be one of"),
    ("k_steps=[1]", "k_steps must be >= 2"),
    ("grpo.group_size=1", "group_size must be >= 2"),
])
def test_bad_value_is_refused_with_the_reason(item, reason):
    with pytest.raises(ValueError, match=reason):
        TrainConfig.from_args([item])


def test_command_line_shape_errors():
    with pytest.raises(ValueError, match="expected key=value"):
        TrainConfig.from_args(["rl_steps"])
    with pytest.raises(ValueError, match="unknown option '--cfg'"):
        TrainConfig.from_args(["--cfg", "x.yaml"])
    with pytest.raises(ValueError, match="cannot read --config"):
        TrainConfig.from_args(["--config", "/nonexistent/recipe.yaml"])
    assert split_args(["--config=a.yaml", "x=1", "--config", "b.yaml"]) == (["a.yaml", "b.yaml"], ["x=1"])


def test_interpolation_and_a_runs_config_json_reload(tmp_path):
    cfg = TrainConfig.from_args(["comm=aspg", "run_dir=runs/${comm}-${density}"])
    assert cfg.run_dir == "runs/aspg-0.01"
    # config.json written by a run carries a runtime record; loading it back skips that record
    import json

    (tmp_path / "config.json").write_text(json.dumps({**dataclasses.asdict(cfg), "runtime": {"device": "cpu"}}))
    assert TrainConfig.from_args(["--config", str(tmp_path / "config.json")]) == cfg


def test_python_callers_may_pass_numbers_as_strings():
    assert TrainConfig(rl_lr="1e-5").rl_lr == 1e-5
    assert TrainConfig(resume="true").resume is True
    with pytest.raises(ValueError, match="rl_lr must be a float"):
        TrainConfig(rl_lr="fast")


def test_every_field_is_documented_and_listed_in_help():
    docs = field_docs()
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert [n for n in names if not docs.get(n)] == []
    text = config_help()
    for n in names:
        assert f"  {n}: " in text
    assert "cuda:LOCAL_RANK" in text  # device's doc


def test_launch_train_help_lists_the_fields():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for flag in ("--help", "-h"):
        r = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), flag], capture_output=True, text=True,
                           env=env, timeout=120, cwd=str(ROOT))
        assert r.returncode == 0, r.stderr
        assert "usage: launch/train.py" in r.stdout and "--config" in r.stdout
        assert "device: str = 'auto'" in r.stdout and "rl_steps: int = 60" in r.stdout and "torchrun" in r.stdout


def test_launch_train_config_error_is_one_line_and_exit_2():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--config", DEMO, "rl_stepz=3"],
                       capture_output=True, text=True, env=env, timeout=120, cwd=str(ROOT))
    assert r.returncode == 2 and "unknown config key 'rl_stepz'" in r.stderr and "Traceback" not in r.stderr


def test_import_sparsecomm_stays_light():
    # omegaconf is imported by rl/config.py only; transformers / trl only when a model is built
    code = ("import sys, sparsecomm, sparsecomm.rl; "
            "heavy = [m for m in ('omegaconf', 'transformers', 'trl') if m in sys.modules]; "
            "assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
