"""One rank of bench_exchange.py (started by it, on loopback or inside an emulated host).

For each size: a dense all_reduce of the update (+ apply), then for each density the sparse
exchange exactly as ASPG and the DDP hook run it (`sparsecomm.exchange.SparseExchange`:
threshold-reuse selection by |residual|, value round trip, encode, transport, decode all,
apply, error-feedback commit) on each path - the all-gather, the split sparse all-reduce - and
the path the volume rule picks. Every repetition adds the same per-rank update to the residual
first (error feedback accumulates; the first repetition estimates the threshold, later ones
reuse it). Times are the maximum over ranks, between barriers; CPU seconds are this process's
(all its threads) during the exchange, reported as the maximum and the mean over ranks, so a
reader can tell the wire from the CPU when ranks share cores.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from sparsecomm.codec import VALUE_CODECS
from sparsecomm.compress import ErrorFeedback, k_for
from sparsecomm.exchange import DenseSink, SparseExchange, TorchDistTransport, choose_path
from sparsecomm.track import CommTracker, ring_allreduce_bytes


def max_over_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def mean_over_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def timed(fn) -> tuple[float, float]:
    """(wall seconds, max over ranks; CPU seconds of this process)."""
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return max_over_ranks(time.perf_counter() - t0), time.process_time() - c0


def dense_exchange(buf, weights, P):
    dist.all_reduce(buf)
    buf.div_(P)
    weights.add_(buf)


def bench_size(n, densities, reps, value, P, rank, out, paths):
    torch.manual_seed(rank)
    u = torch.randn(n).mul_(1e-3)  # the same per-rank update every repetition: error feedback accumulates
    weights = torch.zeros(n)
    buf = torch.empty(n)
    dense = []
    for _ in range(reps):
        buf.copy_(u)
        dense.append(timed(lambda: dense_exchange(buf, weights, P)))
    del buf
    dense_s = min(t for t, _ in dense)
    out({"case": "dense_allreduce", "numel": n, "P": P, "time_s": dense_s, "times_s": [t for t, _ in dense],
         "cpu_s_max": max_over_ranks(min(c for _, c in dense)), "wire_bytes_per_worker": ring_allreduce_bytes(n, 4, P)})
    tr = TorchDistTransport()
    vb = VALUE_CODECS[value].bytes_per_value
    for density in densities:
        k = k_for(n, density)
        volume_path = choose_path(n, k, P, vb)
        for path in paths:
            ef, comm = ErrorFeedback(), CommTracker()
            ex = SparseExchange(tr, value_codec=value, paths=(path,), seed=rank, comm=comm)
            rows = []
            for _ in range(reps):
                e = ef.compensate("w", u)  # the optimizer's accumulate: the same work on every path, not timed
                wall, cpu = timed(lambda: ex.exchange("w", e, k, DenseSink(weights)))
                m = comm.collect(n, 4, P)
                rows.append((wall, cpu, m))
            best = min(range(reps), key=lambda i: rows[i][0])
            wall, cpu, m = rows[best]
            phases = {ph: max_over_ranks(m.get(f"timing/{ph}_s", 0.0))
                      for ph in ("select", "encode", "transfer", "decode", "apply")}
            out({"case": "sparse_exchange", "numel": n, "P": P, "density": density, "value_codec": value, "path": path,
                 "volume_path": volume_path, "time_s": wall, "times_s": [r[0] for r in rows], "phases_s": phases,
                 "cpu_s_max": max_over_ranks(cpu), "cpu_s_mean": mean_over_ranks(cpu),
                 "wire_bytes_per_worker": max_over_ranks(m["comm/sent_bytes"]), "k": k, "selected": m.get("comm/k"),
                 "aggregate_entries": m.get("comm/applied_entries"), "index_codec": m.get("comm/index_codec"),
                 "dense_time_s": dense_s, "speedup_vs_dense": dense_s / wall})
            del ef, ex


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--master", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--sizes", type=int, nargs="+", required=True)
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.01, 0.001])
    ap.add_argument("--value", default="bf16")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--paths", nargs="+", default=["allgather", "split"], help="sparse paths to time")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // a.world))
    dist.init_process_group("gloo", init_method=f"tcp://{a.master}:{a.port}", rank=a.rank, world_size=a.world,
                            timeout=timedelta(minutes=20))
    rows = []

    def out(row):
        row["peak_rss_gib_rank"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        rows.append(row)
        if a.rank == 0:
            print(json.dumps(row), flush=True)

    try:
        for n in a.sizes:
            bench_size(n, a.densities, a.reps, a.value, a.world, a.rank, out, a.paths)
        rss = torch.tensor([rows[-1]["peak_rss_gib_rank"] if rows else 0.0], dtype=torch.float64)
        dist.all_reduce(rss)
        if a.rank == 0:
            with open(a.out, "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
                f.write(json.dumps({"case": "memory", "P": a.world, "peak_rss_gib_all_ranks": float(rss)}) + "\n")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
