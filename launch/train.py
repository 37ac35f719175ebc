"""sparsecomm training entry point: SFT warm start + GRPO with a chosen communication mode.

One process:          python launch/train.py --config launch/recipes/demo.yaml comm=local
One node, 2 workers:  torchrun --nproc-per-node 2 launch/train.py --config launch/recipes/demo.yaml
Several nodes:        torchrun --nnodes 8 --node-rank R --nproc-per-node 1 \\
                          --master-addr HOST0 --master-port 29500 launch/train.py --config CONFIG
Overrides:            ... rl_steps=100 density=0.001 comm=hook optimizer=adamw grpo.group_size=4
                      aspg.importance=magnitude (ASPG options: see sparsecomm.optim.aspg)

Every key of sparsecomm.rl.trainer.TrainConfig can be set in the YAML file or overridden as
key=value. The run directory receives config.json, stats_rank*.jsonl and summary.json;
`sparsecomm report RUN_DIR` turns them into figures.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sparsecomm.rl.trainer import TrainConfig, Trainer, format_summary  # noqa: E402


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cfg = TrainConfig.from_args(argv)
    trainer = Trainer(cfg)
    try:
        summary = trainer.train()
        if trainer.rank == 0:
            print(json.dumps(summary, indent=2))
            print(format_summary(summary, cfg, trainer.world))
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
