"""engine=fsdp2 in the trainer config: what is accepted, and what is refused at start with the reason."""
import re

import pytest

from sparsecomm.rl.config import ENGINES, TrainConfig

OK = ["engine=fsdp2", "comm=hook", "optimizer=adamw", "mesh=2x2"]


def test_fsdp2_engine_is_registered_and_parses():
    assert "fsdp2" in ENGINES
    cfg = TrainConfig.from_args(OK)
    assert (cfg.engine, cfg.mesh, cfg.comm) == ("fsdp2", "2x2", "hook")
    assert TrainConfig.from_args(OK[:-1] + ["comm=ddp"]).comm == "ddp"  # native HSDP, mesh WORLDx1
    assert TrainConfig.from_args(OK + ["comm=aspg", "optimizer=aspg"]).comm == "aspg"  # ShardedASPG


@pytest.mark.parametrize("override, reason", [
    (["optimizer=aspg", "comm=coordinator", "coordinator=tcp://127.0.0.1:5555"], "does not run the coordinator"),
    (["comm=powersgd"], "supports comm=hook (sparse HSDP of the gradient), comm=aspg"),
    (["mesh=2by2"], "mesh must be RxS"),
    (["lora_rank=4"], "supports fp32 full fine-tuning"),
    (["precision=bf16"], "supports fp32 full fine-tuning"),
    (["checkpoint_every=5"], "torch.distributed.checkpoint"),
])
def test_fsdp2_refusals(override, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        TrainConfig.from_args(OK + override)
