"""One rank of bench_ddp.py: a plain DDP training script, as a new user would write it, with one comm hook.

Model: a 25.2M-parameter MLP (1024 -> 4096 -> 4096 -> 1024, tanh) regressing a fixed random
teacher of the same shape (every rank builds the same student and teacher from fixed seeds);
each rank draws its own batch of 32 inputs per step (seed: rank, step), SGD on the squared error
summed over the 1024 outputs (mean over the batch). The gradients of a batch of 32 have rank <= 32
per matrix, so PowerSGD rank 1 is lossy here, as on a real model.

Hooks: `default` (DDP's all-reduce), `powersgd` (torch's powerSGD_hook, rank 1, error feedback,
warm start, one bucket: it breaks on gloo with several), `sparse` (sparsecomm's hook at 1% with its
defaults: threshold-reuse top-k, the volume rule's path - split at P=4 - and index codec - Rice -,
overlap with backward), `sparse-measured` (the same with `switch="measured"`: it times the paths
and raw vs Rice indices and keeps the fastest, or the fewest-bytes candidate when it is within
10%). Per step: wall time
(max over ranks), this process's CPU seconds, bytes sent; every `eval_every` steps the loss on a
fixed held-out batch (time excluded). Rows go to --out (rank 0).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1024, 4096), nn.Tanh(), nn.Linear(4096, 4096), nn.Tanh(), nn.Linear(4096, 1024))


def max_over_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def powersgd_bytes(model: nn.Module, rank: int, P: int) -> int:
    """Per-worker ring all-reduce volume of powerSGD_hook (a formula: the hook counts nothing): P and Q
    (m + n) x rank floats per matrix, vectors (biases) dense."""
    from sparsecomm.track import ring_allreduce_bytes

    n = 0
    for p in model.parameters():
        n += (p.shape[0] + p.shape[1]) * rank if p.dim() == 2 else p.numel()
    return ring_allreduce_bytes(n, 4, P)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--master", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--hook", choices=["default", "powersgd", "sparse", "sparse-measured"], required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--out", required=True)
    ap.add_argument("--hook-kw", default="{}", help="JSON: extra SparseHookState arguments (sparse hooks)")
    a = ap.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // a.world))
    dist.init_process_group("gloo", init_method=f"tcp://{a.master}:{a.port}", rank=a.rank, world_size=a.world,
                            timeout=timedelta(minutes=20))
    P = a.world
    try:
        teacher, student = mlp(1), mlp(0)
        for p in teacher.parameters():
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(12345)
        x_eval = torch.randn(256, 1024, generator=g)
        y_eval = teacher(x_eval)
        numel = sum(p.numel() for p in student.parameters())
        state = None
        if a.hook == "powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

            ddp = DDP(student, bucket_cap_mb=10_000)
            state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=2)
            ddp.register_comm_hook(state, psgd.powerSGD_hook)
        elif a.hook.startswith("sparse"):
            from sparsecomm.exchange import SparseHookState, sparse_topk_hook

            ddp = DDP(student)
            state = SparseHookState(density=a.density, seed=a.rank,
                                    switch="measured" if a.hook == "sparse-measured" else "volume",
                                    **json.loads(a.hook_kw))
            ddp.register_comm_hook(state, sparse_topk_hook)
        else:
            ddp = DDP(student)
        opt = torch.optim.SGD(ddp.parameters(), lr=a.lr)
        rows, elapsed = [], 0.0

        def sq_error(out, y):  # summed over outputs, mean over the batch
            return (out - y).pow(2).sum(1).mean()

        def evaluate(step):
            with torch.no_grad():
                loss = float(sq_error(student(x_eval), y_eval))
            rows.append({"kind": "eval", "step": step, "elapsed_s": elapsed, "eval_loss": loss})

        evaluate(0)
        for step in range(1, a.steps + 1):
            gb = torch.Generator().manual_seed(1000 * a.rank + step)
            x = torch.randn(32, 1024, generator=gb)
            y = teacher(x)
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            opt.zero_grad(set_to_none=False)
            sq_error(ddp(x), y).backward()
            opt.step()
            wall = max_over_ranks(time.perf_counter() - t0)
            cpu = time.process_time() - c0
            elapsed += wall
            sent = (state.last_metrics.get("comm/sent_bytes") if a.hook.startswith("sparse")
                    else powersgd_bytes(student, 1, P) if a.hook == "powersgd" and step >= 2
                    else 4 * numel * 2 * (P - 1) // P)
            rows.append({"kind": "step", "step": step, "step_s": wall, "cpu_s_max": max_over_ranks(cpu),
                         "sent_bytes": sent, "elapsed_s": elapsed,
                         "path": state.last_metrics.get("comm/path") if a.hook.startswith("sparse") else None})
            if step % a.eval_every == 0 or step == a.steps:
                evaluate(step)
        if a.rank == 0:
            with open(a.out, "w") as f:
                for r in rows:
                    f.write(json.dumps({"hook": a.hook, "P": P, "numel": numel, **r}) + "\n")
        if a.hook.startswith("sparse"):
            state.close()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
