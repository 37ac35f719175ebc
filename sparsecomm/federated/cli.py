"""`sparsecomm federated`: run federated RL over sparse deltas, in one process or over Flower.

    sparsecomm federated --set rounds=20 density_up=0.01 density_down=0.01 split=noniid
    sparsecomm federated --transport flower --set clients=4 rounds=5          # Flower simulation (Ray)
    sparsecomm federated --base ckpt/ --out runs/fed.json                      # from a save_pretrained model
    sparsecomm federated --transport zmq-server --bind tcp://0.0.0.0:5600 --set clients=4 rounds=5
    sparsecomm federated --transport zmq-client --connect tcp://HOST:5600 --client 0     # one per client
    flwr run deploy/flower LINK --run-config 'set="clients=4 rounds=5" out="fed.json"'  # flower-superlink/-supernode
                                                   # (deploy/flower/README.md: the processes to start first)

Every FedConfig field can be set with `--set name=value` (values parsed as Python literals:
`tasks=('addition','sort')`, `grpo={'group_size':4,'max_new_tokens':4,'beta':0.0}`). The base
model is `--base` (a local save_pretrained directory of a GPT-2-style model trained with the
char tokenizer) or the built-in `model` initialised from `seed`. Prints one line per round and
writes the round reports and the final held-out accuracy to `--out` as JSON.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--transport", choices=("local", "flower", "zmq-server", "zmq-client"), default="local",
                   help="local: the in-process loop; flower: Flower's simulation (needs sparsecomm[federated]); "
                        "zmq-server / zmq-client: one server and a process per client over ZeroMQ")
    p.add_argument("--bind", default="tcp://127.0.0.1:5600", help="zmq-server: address to bind")
    p.add_argument("--connect", default="tcp://127.0.0.1:5600", help="zmq-client: the server's address")
    p.add_argument("--client", type=int, help="zmq-client: this client's id (its data partition), 0..clients-1")
    p.add_argument("--leave-after", type=int, help="zmq-client: leave after uploading in this many rounds")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="FedConfig overrides")
    p.add_argument("--base", help="base checkpoint directory (save_pretrained); default: the built-in model from seed")
    p.add_argument("--out", help="write round reports and final accuracy here (JSON)")


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ValueError(f"--set {pair!r}: expected FIELD=VALUE")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw  # a bare word: a string (split=noniid)
    return out


def base_state(cfg, base_dir: str | None = None) -> dict:
    """The federated run's starting weights: a save_pretrained directory, or the built-in model from cfg.seed."""
    from ..rl.models import build_model, char_tokenizer
    from .client import model_state

    model, _ = build_model(base_dir or cfg.model, char_tokenizer() if not base_dir else None, seed=cfg.seed)
    return model_state(model)


def print_rounds(reports: list[dict]) -> None:
    for r in reports:
        print(f"round {r['round']}: accepted {r['accepted']} refused {r['refused']} missing {r['missing']} "
              f"up {r['bytes_up']} B down {r['bytes_down']} B")


def finish(local, reports: list[dict], path: str | None, **extra) -> dict:
    """The held-out accuracy of the model `local.server` holds (a FedRun's evaluator), printed, and written with
    the configuration, the round reports and `extra` to `path` as JSON."""
    final = local.evaluate()
    print(json.dumps(final))
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"config": local.cfg.to_dict(), "rounds": reports, "final": final, **extra},
                                         indent=2, default=str))
    return final


def run(args) -> int:
    import dataclasses

    from .config import FedConfig
    from .loop import FedRun

    def base_for(cfg):
        return base_state(cfg, args.base)

    if args.transport == "zmq-client":  # the configuration comes from the server
        from .zeromq import ZmqFedClient

        if args.client is None:
            print("sparsecomm federated: error: --transport zmq-client needs --client ID")
            return 2
        c = ZmqFedClient(args.connect, args.client, base_for, leave_after=args.leave_after).run()
        print(json.dumps({"client": args.client, "rounds": c.rounds, "refused": c.refused}))
        return 0
    try:
        cfg = FedConfig.from_dict(_overrides(args.set))
    except (ValueError, TypeError) as e:
        print(f"sparsecomm federated: error: {e}")
        return 2
    base = base_for(cfg)
    local = FedRun(cfg, base)  # also the evaluator of the Flower run's final model
    reports = []
    if args.transport == "local":
        for rnd in range(1, cfg.rounds + 1):
            reports.append(dataclasses.asdict(local.round(rnd)))
            print_rounds(reports[-1:])
    elif args.transport == "zmq-server":
        from .client import to_wire
        from .zeromq import ZmqFedServer

        zs = ZmqFedServer(cfg, to_wire(base, cfg.layout), args.bind)
        print(f"federated server on {zs.address}: waiting for {cfg.clients} clients", flush=True)
        reports = [dataclasses.asdict(r) for r in zs.serve()]
        print_rounds(reports)
        local.server = zs.server  # evaluate the model the clients hold
    else:
        from .flower import run_simulation

        sink = run_simulation(cfg, base)
        reports = [dataclasses.asdict(r) for r in sink["strategy"].reports]
        local.server = sink["strategy"].server  # evaluate the model the Flower clients hold
    finish(local, reports, args.out)
    return 0
