"""Federated RL over sparse deltas: clients run local GRPO steps and upload the top-k of their
model change with client-side error feedback; the server aggregates (FedAvg, FedProx, FedAdam),
re-sparsifies its step for the downlink, samples a fraction of clients per round and closes a
round at a quorum and a deadline.

    from sparsecomm.federated import FedConfig, FedRun          # in one process (benchmarks, tests)
    from sparsecomm.federated.flower import run_simulation       # the same parts over Flower (flwr)

Parts: config.py (FedConfig), split.py (seed-fixed IID / non-IID client data), client.py (local
GRPO, uplink EF + top-k + codec, downlink apply), server.py (validation, aggregators, downlink),
loop.py (the in-process round loop), flower.py (Flower Strategy, client Mod, ClientApp/ServerApp;
imports flwr, which `import sparsecomm.federated` does not).
"""
from .client import LocalTrainer, Uplink, apply_downlinks
from .config import FedConfig
from .loop import FedRun, sample_clients
from .server import AGGREGATORS, FedServer, RoundReport
from .split import ClientData, split_clients

__all__ = ["FedConfig", "FedRun", "FedServer", "RoundReport", "LocalTrainer", "Uplink", "apply_downlinks", "AGGREGATORS",
           "ClientData", "split_clients", "sample_clients"]
