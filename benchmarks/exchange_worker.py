"""One rank of bench_exchange.py (started by it, on loopback or inside an emulated host).

For each size: a dense all_reduce of the update (+ apply), then for each density the sparse
exchange as ASPG runs it - select (sampled threshold on |residual|: ASPG's importance="magnitude";
the default "impact" first forms |residual x EMA(grad)|, a cost results/codec.md measures), value
round trip + error-feedback update, encode, size exchange + padded all_gather, decode + rank-order
mean, apply - with the path the automatic switch picks; optionally DDP steps with the default
hook, the sparse hook and no communication (no_sync). Times are the maximum over ranks, between
barriers.
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
import torch.nn as nn

from sparsecomm.codec import VALUE_CODECS, encode, roundtrip_values
from sparsecomm.compress import ErrorFeedback, SampledThreshold, k_for
from sparsecomm.exchange import PathChooser, TorchDistTransport, apply_mean_, choose_path
from sparsecomm.track import ring_allreduce_bytes


def max_over_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return max_over_ranks(time.perf_counter() - t0)


def dense_exchange(buf, weights, P):
    dist.all_reduce(buf)
    buf.div_(P)
    weights.add_(buf)


def bench_size(n, densities, reps, value, P, rank, out):
    torch.manual_seed(rank)
    u = torch.randn(n).mul_(1e-3)  # the same per-rank update every repetition: error feedback accumulates
    weights = torch.zeros(n)
    buf = torch.empty(n)
    dense_s = []
    for _ in range(reps):
        buf.copy_(u)
        dense_s.append(timed(lambda: dense_exchange(buf, weights, P)))
    del buf
    out({"case": "dense_allreduce", "numel": n, "P": P, "time_s": min(dense_s), "times_s": dense_s,
         "wire_bytes_per_worker": ring_allreduce_bytes(n, 4, P)})
    tr = TorchDistTransport()
    for density in densities:
        ef, sel = ErrorFeedback(), SampledThreshold(seed=rank)
        path = choose_path(n, density, P, VALUE_CODECS[value].bytes_per_value)
        rows = []
        for _ in range(reps):
            e = ef.compensate("w", u)  # the optimizer's accumulate: the same work on the dense path, not timed
            phases, info = {}, {}

            def sparse():
                t = time.perf_counter
                t0 = t()
                if path == "dense":
                    dist.all_reduce(e)
                    e.div_(P)
                    weights.add_(e)
                    e.zero_()
                    phases["transfer"] = t() - t0
                    info["wire"] = ring_allreduce_bytes(n, 4, P)
                    return
                d = roundtrip_values(sel.select(e, k_for(n, density)), value)
                ef.update("w", d)
                t1 = t()
                payload = encode(d, "auto", value)
                t2 = t()
                payloads = tr.all_gather_bytes(payload)
                t3 = t()
                split = {}
                applied = apply_mean_(payloads, n, lambda dd, w: dd.add_to(weights, alpha=w), split)
                phases.update(select=t1 - t0, encode=t2 - t1, transfer=t3 - t2, decode=split["decode"], apply=split["apply"])
                info.update(wire=tr.wire_bytes([len(b) for b in payloads])[0], payload=len(payload), k=d.k,
                            agg_k=applied)

            total = timed(sparse)
            rows.append((total, {k: max_over_ranks(v) for k, v in phases.items()}, info))
        best = min(rows, key=lambda r: r[0])
        # the measured switch, for real: fed this run's timings of both paths, its pick is run once more
        chooser = PathChooser("measured", probe_every=50, ema=1.0)
        chooser.observe("sparse" if path == "sparse" else "dense", best[0])
        chooser.observe("dense", min(dense_s))
        auto_path = chooser.choose(n, density, P, VALUE_CODECS[value].bytes_per_value)
        auto_times = []
        for _ in range(reps):
            e = ef.compensate("w", u)
            auto_times.append(timed(lambda: dense_exchange(e, weights, P)) if auto_path == "dense" else timed(sparse))
            if auto_path == "dense":
                e.zero_()  # everything was sent (bookkeeping, outside the timed region)
        auto_s = min(auto_times)
        out({"case": "aspg_exchange", "numel": n, "P": P, "density": density, "value_codec": value, "path": path,
             "time_s": best[0], "times_s": [r[0] for r in rows], "phases_s": best[1],
             "payload_bytes": best[2].get("payload"), "wire_bytes_per_worker": best[2]["wire"],
             "k": best[2].get("k"), "applied_entries": best[2].get("agg_k"), "dense_time_s": min(dense_s),
             "speedup_vs_dense": min(dense_s) / best[0], "measured_switch_path": auto_path,
             "measured_switch_time_s": auto_s, "measured_switch_speedup_vs_dense": min(dense_s) / auto_s})
        del ef


class Stack(nn.Module):
    def __init__(self, n, d=4096):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(d, d, bias=False) for _ in range(max(1, round(n / d / d)))])

    def forward(self, x):
        return self.layers(x)


def bench_hook(n, density, value, reps, P, rank, out):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparsecomm.exchange import SparseHookState, sparse_topk_hook

    torch.manual_seed(0)
    model = Stack(n)
    numel = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, 4096)
    for mode in ("no_sync", "default_allreduce", "sparse_hook"):
        ddp = DDP(model, gradient_as_bucket_view=True)
        if mode == "sparse_hook":
            state = SparseHookState(density=density, value_codec=value, seed=rank)
            ddp.register_comm_hook(state, sparse_topk_hook)

        def step():
            ddp.zero_grad(set_to_none=False)
            if mode == "no_sync":
                with ddp.no_sync():
                    ddp(x).sum().backward()
            else:
                ddp(x).sum().backward()

        step()  # first iteration: DDP rebuilds buckets
        times = [timed(step) for _ in range(reps)]
        row = {"case": f"ddp_{mode}", "numel": numel, "P": P, "time_s": min(times), "times_s": times}
        if mode == "sparse_hook":
            row.update(density=density, value_codec=value, wire_bytes_per_worker=state.last_metrics.get("comm/sent_bytes"))
        out(row)
        del ddp


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
    ap.add_argument("--hook-size", type=int, default=0, help="also benchmark DDP hooks at this size (0: skip)")
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
            bench_size(n, a.densities, a.reps, a.value, a.world, a.rank, out)
        if a.hook_size:
            bench_hook(a.hook_size, 0.01, a.value, a.reps, a.world, a.rank, out)
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
