"""A trainer process for the coordinator tests and benchmarks/bench_faults.py: ASPG through the
ZeroMQ coordinator.

    python -m tests.integration.coord_worker --endpoint tcp://127.0.0.1:5555 --worker t0 --out t0.json \\
        [--steps 5 | --until-version 20] [--weight-decay 0.1] [--ckpt t0.pt [--resume]] \\
        [--pause-in-push-at VERSION --marker FILE] [--step-sleep-s 0.2]

Fault hooks: `--die-after N` exits abruptly (no leave) before step N; `--pause-in-push-at V`
sends its push at version V, touches `--marker` and then sleeps before reading the aggregate,
so a test can `kill -9` it exactly mid-exchange. `--ckpt` saves model, optimizer, transport and
data-generator state after every step (atomically), `--resume` starts from it.
"""
import argparse
import hashlib
import json
import os
import time

import torch
import torch.nn as nn

from sparsecomm.exchange import CoordinatorTransport
from sparsecomm.optim import ASPG


def model():
    torch.manual_seed(0)  # every trainer starts from the same weights
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))


def digest(m) -> str:
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in m.parameters())).hexdigest()


def param_groups(m, weight_decay: float):
    """Two groups with different decay (the second half as strong), so per-group factors are exercised;
    in module order, so the flat layout is the same as with one group."""
    if not weight_decay:
        return m.parameters()
    return [{"params": list(m[0].parameters()), "weight_decay": weight_decay},
            {"params": list(m[2].parameters()), "weight_decay": weight_decay / 2}]


def pause_in_push(tr, version: int, marker: str) -> None:
    """After sending the push made at `version`, touch `marker` and hang: a kill -9 lands mid-exchange."""
    conn = tr.client.conn
    send = conn.send

    def wrapped(op, *frames, **fields):
        send(op, *frames, **fields)
        if op == "push" and tr.client.version == version:
            with open(marker, "w") as f:
                f.write(str(version))
            time.sleep(3600)

    conn.send = wrapped


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--worker", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--until-version", type=int, default=-1, help="train until the weights reach this version (not --steps)")
    ap.add_argument("--die-after", type=int, default=-1, help="exit abruptly after this many steps")
    ap.add_argument("--out", required=True)
    ap.add_argument("--curve", nargs=2, default=None, help="client .key_secret and server .key")
    ap.add_argument("--timeout-s", type=float, default=30)
    ap.add_argument("--adaptive", action="store_true", help="ASPG adaptive density (each worker its own k)")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--ckpt", default=None, help="save a checkpoint here after every step")
    ap.add_argument("--resume", action="store_true", help="start from --ckpt")
    ap.add_argument("--pause-in-push-at", type=int, default=-1)
    ap.add_argument("--marker", default=None)
    ap.add_argument("--wait-for", default=None, help="start (load --ckpt, join) only once this file exists: a "
                    "replacement started ahead, so a restart costs a join, not a Python + torch start")
    ap.add_argument("--step-sleep-s", type=float, default=0.0, help="pace the steps (stands in for compute time)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    m = model()
    if a.wait_for:
        deadline = time.monotonic() + 300
        while not os.path.exists(a.wait_for) and time.monotonic() < deadline:
            time.sleep(0.01)
    ck = torch.load(a.ckpt, weights_only=False) if a.resume else None
    if ck is not None:
        m.load_state_dict(ck["model"])
    tr = CoordinatorTransport(a.endpoint, a.worker, outbox=a.ckpt + ".outbox" if a.ckpt else None,
                              timeout_s=a.timeout_s, heartbeat_s=0.2,
                              curve=tuple(a.curve) if a.curve else None)
    opt = ASPG(param_groups(m, a.weight_decay), lr=1e-2, density=0.05, value_codec="fp32", transport=tr,
               weight_decay=a.weight_decay,
               **({"adaptive_epsilon": 0.5, "min_density": 0.01, "max_density": 0.2} if a.adaptive else {}))
    g = torch.Generator().manual_seed(int(hashlib.sha256(a.worker.encode()).hexdigest(), 16) % 2**31)
    start = 0
    if ck is not None:
        opt.load_state_dict(ck["opt"])
        tr.load_state_dict(ck["transport"])
        g.set_state(ck["gen"])
        start = ck["step"]
    joined_at = tr.client.version
    if a.pause_in_push_at >= 0:
        pause_in_push(tr, a.pause_in_push_at, a.marker)
    step = start
    while (tr.client.version < a.until_version) if a.until_version >= 0 else (step < a.steps):
        if step == a.die_after:
            os._exit(9)  # no leave, no close: a crash
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        opt.step()
        step += 1
        if a.step_sleep_s:
            time.sleep(a.step_sleep_s)
        if a.ckpt:
            torch.save({"model": m.state_dict(), "opt": opt.state_dict(), "transport": tr.state_dict(),
                        "gen": g.get_state(), "step": step, "version": tr.client.version}, a.ckpt + ".tmp")
            os.replace(a.ckpt + ".tmp", a.ckpt)  # atomic: a kill -9 leaves the previous step's checkpoint
    with open(a.out, "w") as f:
        json.dump({"digest": digest(m), "version": tr.client.version, "hash": tr.client.hash, "joined": tr.how_joined,
                   "joined_at_version": joined_at, "resumed_from_step": start if ck is not None else None,
                   "steps": step, "metrics": opt.last_metrics, "resume": tr.resume_report}, f)
    torch.save({n: p.detach().clone() for n, p in m.named_parameters()}, a.out + ".weights.pt")
    tr.close()


if __name__ == "__main__":
    main()
