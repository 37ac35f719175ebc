"""`sparsecomm coordinator ...`: the CLI, derived from CoordinatorConfig's fields (one definition:
a field `deadline_s` becomes `--deadline-s`, its type, default, choices and help come from the
dataclass; booleans get `--x/--no-x`)."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import typing

from .config import CoordinatorConfig

_TYPES = {str: str, int: int, float: float}


def _scalar(tp):
    """int for `int`, `int | None`; bool for `bool`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def add_arguments(p: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(CoordinatorConfig)
    for f in dataclasses.fields(CoordinatorConfig):
        flag, tp, meta = "--" + f.name.replace("_", "-"), _scalar(hints[f.name]), f.metadata
        help_text = f"{meta.get('help', '')} (default: {f.default})"
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=meta.get("help"))
        else:
            p.add_argument(flag, type=_TYPES[tp], default=f.default, choices=meta.get("choices"), help=help_text)
    p.add_argument("--max-seconds", type=float, default=None, help="stop after this long (default: run until killed)")


def config_from_args(args: argparse.Namespace) -> CoordinatorConfig:
    return CoordinatorConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CoordinatorConfig)})


def run(args: argparse.Namespace) -> int:
    import signal

    from .server import Coordinator

    logging.basicConfig(level=logging.INFO, format="%(asctime)s coordinator %(levelname)s %(message)s")
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"sparsecomm coordinator: {e}", flush=True)
        return 2
    coord = Coordinator(cfg)

    def _stop(*_):
        coord.stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"coordinator listening on {coord.endpoint}", flush=True)
    coord.serve(args.max_seconds)
    return 0
