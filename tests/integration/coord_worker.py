"""A trainer process for the coordinator tests: ASPG through the ZeroMQ coordinator."""
import argparse
import hashlib
import json
import os

import torch
import torch.nn as nn

from sparsecomm.exchange import CoordinatorTransport
from sparsecomm.optim import ASPG


def model():
    torch.manual_seed(0)  # every trainer starts from the same weights
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))


def digest(m) -> str:
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in m.parameters())).hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--worker", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--die-after", type=int, default=-1, help="exit abruptly after this many steps")
    ap.add_argument("--out", required=True)
    ap.add_argument("--curve", nargs=2, default=None, help="client .key_secret and server .key")
    ap.add_argument("--timeout-s", type=float, default=30)
    ap.add_argument("--adaptive", action="store_true", help="ASPG adaptive density (each worker its own k)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    m = model()
    tr = CoordinatorTransport(a.endpoint, a.worker, timeout_s=a.timeout_s, heartbeat_s=0.2,
                              curve=tuple(a.curve) if a.curve else None)
    opt = ASPG(m.parameters(), lr=1e-2, density=0.05, value_codec="fp32", transport=tr,
               **({"adaptive_epsilon": 0.5, "min_density": 0.01, "max_density": 0.2} if a.adaptive else {}))
    g = torch.Generator().manual_seed(int(hashlib.sha256(a.worker.encode()).hexdigest(), 16) % 2**31)
    for step in range(a.steps):
        if step == a.die_after:
            os._exit(9)  # no leave, no close: a crash
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        opt.step()
    with open(a.out, "w") as f:
        json.dump({"digest": digest(m), "version": tr.client.version, "hash": tr.client.hash, "joined": tr.how_joined,
                   "metrics": opt.last_metrics}, f)
    tr.close()


if __name__ == "__main__":
    main()
