"""The `sparsecomm` command. Each subcommand is a module with `add_arguments(parser)` and
`run(args) -> exit code`, registered in COMMANDS; heavy imports happen inside `run`.

    sparsecomm demo            # compression pipeline on a GPT-2-124M-sized update
    sparsecomm report RUN_DIR  # figures + summary.md from a run's StepStats JSONL
    sparsecomm coordinator --bind tcp://0.0.0.0:5555   # the ZeroMQ aggregation service
    sparsecomm keys DIR server trainer-0               # CURVE certificates
    sparsecomm matrix --preset quick --out DIR         # research matrix + REPORT.md
    sparsecomm cluster run --hosts 8 --rate-mbit 100 -- launch/train.py --config CONFIG
    sparsecomm simulate --P 8 64 512 --links-gbps 0.1 1 10 100     # scale model of one exchange
    sparsecomm merge apply --base base/ --deltas a.spd b.spd --method ties --out merged/   # delta merging
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("sparsecomm.pipeline_demo", "select, encode and decode a GPT-2-124M-sized update; print bytes and times"),
    "coordinator": ("sparsecomm.exchange.coordinator", "run the ZeroMQ coordinator (aggregation, versions, rollout sync)"),
    "keys": ("sparsecomm.keys", "make CURVE key pairs for the coordinator and its clients"),
    "report": ("sparsecomm.track.report", "turn a run directory's StepStats JSONL into PNG figures and a Markdown summary"),
    "cluster": ("sparsecomm.cluster.cli", "emulated hosts (network namespaces, shaped links) and torchrun across them"),
    "matrix": ("sparsecomm.research.matrix", "run the research plan's experiment matrix and write REPORT.md with verdicts"),
    "simulate": ("sparsecomm.simulate", "alpha-beta model: predicted exchange time per path for large P and fast links"),
    "federated": ("sparsecomm.federated.cli", "federated RL over sparse deltas (in-process or Flower simulation)"),
    "merge": ("sparsecomm.merge", "model merging by sparse deltas: extract, info, apply (sum, task arithmetic; TIES/DARE via mergekit)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsecomm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args._module.run(args)


if __name__ == "__main__":
    sys.exit(main())
