"""One trainer of bench_coordinator.py: pushes a fixed 1% delta every round, applies the aggregate."""
import argparse
import json
import time

import torch

from sparsecomm.codec import decode, encode
from sparsecomm.compress import RandomK, k_for
from sparsecomm.exchange import CoordinatorClient


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--worker", required=True)
    ap.add_argument("--numel", type=int, required=True)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    weights = torch.zeros(a.numel)  # every trainer starts equal: one seeds the coordinator, the rest are in sync
    client = CoordinatorClient(a.endpoint, a.worker, timeout_s=600, heartbeat_s=1.0)
    client.join("bench", weights, lambda d: d.add_to(weights), lambda f: weights.copy_(f))
    u = torch.randn(a.numel, generator=torch.Generator().manual_seed(a.seed)).mul_(1e-3)  # in place: 16 trainers share 24 GB
    payload = encode(RandomK(seed=a.seed).select(u, k_for(a.numel, a.density)), "auto", "bf16")
    del u  # 16 trainers share 24 GB: keep only the weights
    rows = []
    for r in range(a.rounds):
        s0, r0 = client.conn.sent_bytes, client.conn.recv_bytes
        t0 = time.perf_counter()
        agg = client.push(payload, r + 1)
        t1 = time.perf_counter()
        d = decode(agg)
        d.add_to(weights)
        t2 = time.perf_counter()
        rows.append({"round_s": t1 - t0, "apply_s": t2 - t1, "sent_bytes": client.conn.sent_bytes - s0,
                     "recv_bytes": client.conn.recv_bytes - r0, "aggregate_k": d.k})
    with open(a.out, "w") as f:
        json.dump({"worker": a.worker, "rows": rows, "payload_bytes": len(payload), "version": client.version}, f)
    client.close()


if __name__ == "__main__":
    main()
