"""sparsecomm training entry point: SFT warm start + GRPO with a chosen communication mode.

One process:          python launch/train.py --config launch/recipes/demo.yaml comm=local
One node, 2 workers:  torchrun --nproc-per-node 2 launch/train.py --config launch/recipes/demo.yaml
DeepSpeed (ZeRO):     torchrun --nproc-per-node 2 launch/train.py --config launch/recipes/demo.yaml \\
                          --config launch/recipes/deepspeed_zero2.yaml      (or the `deepspeed` launcher)
One GPU:              python launch/train.py --config launch/recipes/demo.yaml comm=local device=cuda
One node, 8 GPUs:     torchrun --nproc-per-node 8 launch/train.py --config CONFIG   (device=auto: cuda:LOCAL_RANK, NCCL)
Several nodes:        torchrun --nnodes 8 --node-rank R --nproc-per-node 1 \\
                          --master-addr HOST0 --master-port 29500 launch/train.py --config CONFIG
Federated RL:         python launch/train.py mode=federated clients=8 rounds=20 split=noniid density_up=0.01 \\
                          [transport=flower|zmq-server|zmq-client] [out=fed.json]   (= sparsecomm federated)
Overrides:            ... rl_steps=100 density=0.001 comm=hook optimizer=adamw grpo.group_size=4
                      aspg.importance=magnitude (ASPG options: see sparsecomm.optim.aspg)

Every field of sparsecomm.rl.config.TrainConfig (listed below) can be set in a YAML file or
overridden as key=value (values are YAML; later sources win). The run directory receives
config.json (with the device, backend and torch/CUDA/NCCL versions it ran on), stats_rank*.jsonl
and summary.json; `sparsecomm report RUN_DIR` turns them into figures. Needs sparsecomm installed
(`pip install -e '.[rl]'`, or PYTHONPATH=. from a checkout).
"""
import argparse
import json
import sys

from sparsecomm.rl.config import TrainConfig, config_help


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="config fields (key=value):\n" + config_help())
    p.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                   help="a recipe (e.g. launch/recipes/demo.yaml); repeatable, later files win")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied after the files")
    # the `deepspeed` launcher passes --local_rank=N (and sets LOCAL_RANK, which is what is read)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return p


FEDERATED_OPTIONS = ("transport", "out", "base", "bind", "connect", "client", "leave-after")


def federated(args) -> int:
    """mode=federated: `sparsecomm federated` with the other key=value pairs as FedConfig fields (values
    as in its --set: Python literals or bare words) and transport=, out=, base=, bind=, connect=, client=,
    leave-after= as its options."""
    if args.config:
        print("launch/train.py: config error: mode=federated takes FedConfig fields as key=value "
              "(sparsecomm federated --help); --config recipes are the trainer's", file=sys.stderr)
        return 2
    from sparsecomm.cli import main as cli

    argv, sets = ["federated"], []
    for pair in args.overrides:
        key, _, value = pair.partition("=")
        if key == "mode":
            continue
        if key in FEDERATED_OPTIONS:
            argv += [f"--{key}", value]
        else:
            sets.append(pair)
    return cli(argv + (["--set", *sets] if sets else []))


def main(argv: list[str]) -> int:
    args = parser().parse_intermixed_args(argv)  # --config may come after overrides, as before
    if "mode=federated" in args.overrides:
        return federated(args)
    try:
        cfg = TrainConfig.load(args.config, args.overrides)
    except ValueError as e:  # a config error is the user's to fix: say it in one line
        print(f"launch/train.py: config error: {e}", file=sys.stderr)
        return 2
    from sparsecomm.rl.trainer import Trainer, format_summary  # after parsing: --help stays fast

    try:
        trainer = Trainer(cfg)
    except ValueError as e:  # device / backend / resume refused before any training: one line, no hang
        print(f"launch/train.py: cannot start: {e}", file=sys.stderr)
        return 2
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
