"""A tiny ASPG training run for one rank; started by the multi-host tests inside a namespace."""
import argparse
import hashlib
import json
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from sparsecomm.dist_utils import shutdown_process_group
from sparsecomm.exchange import TorchDistTransport
from sparsecomm.optim import ASPG


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--master", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{a.master}:{a.port}", rank=a.rank, world_size=a.world,
                            timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 8))
        opt = ASPG(model.parameters(), lr=1e-3, density=0.02, transport=TorchDistTransport(), dense_baseline_every=2)
        g = torch.Generator().manual_seed(a.rank)
        metrics = {}
        for _ in range(a.steps):
            x, y = torch.randn(16, 64, generator=g), torch.randn(16, 8, generator=g)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            metrics = {**metrics, **opt.last_metrics}
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
        with open(a.out, "w") as f:
            json.dump({"rank": a.rank, "digest": digest, "metrics": metrics}, f)
    finally:
        shutdown_process_group()  # barrier (bounded), then destroy: no teardown under a peer's last collective


if __name__ == "__main__":
    main()
