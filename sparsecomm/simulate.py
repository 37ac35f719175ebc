"""`sparsecomm simulate`: an alpha-beta model of one exchange at scales this machine cannot run.

Why: the emulated hosts here put P ranks on 2 cores, so their CPU phases run P/2 times slower
than on real hosts with a core (or a GPU) per rank, while their links are real. The model
separates the two: wire time from bytes and link speed, CPU time from per-element costs
measured in one process on this machine (`calibrate`), scaled by how many ranks share a core.

Per exchange of N fp32 values at density d (k = dN), P ranks, link bandwidth B bytes/s and
per-message latency a (full-bisection network: each rank's NIC is the bottleneck), b bytes per
sparse entry (index + value):

    dense      ring all-reduce    2(P-1) a + 2(P-1)/P x 4N / B            + reduce N + apply N
    allgather  sizes + payload    2(P-1) a + (P-1) k b / B
               CPU                select N + encode k + decode (P k) + apply (P k)
    split      phase 1 (a2a)      2(P-1) a + (P-1)/P x k b / B
               owner              decode k + accumulate k + select N/P + encode k/P
               phase 2 (gather)   2(P-1) a + (P-1) k/P x b / B
               CPU                select N + encode k + decode k + apply k (+ the owner row)
    powersgd   rank r, per matrix m x n: P = M Q, all-reduce P, orthonormalise, Q = M^T P,
               all-reduce Q, M ~ P Q^T: 2 ring all-reduces of sum(m) r and sum(n) r floats,
               CPU ~ 3 x 2 m n r flops at the measured matmul rate

Costs are per rank; `cpu_share` multiplies every CPU term (P ranks on C cores: P / C), which is
how the model is checked against the emulated hosts (benchmarks/bench_scale.py reports its
error there) before it predicts P = 64 or 512 with cpu_share = 1.

    sparsecomm simulate                                   # GPT-2 124M, 1%, P in 8 64 512, 4 links
    sparsecomm simulate --numel 354823168 --density 0.001 --P 8 64 --links-gbps 0.1 1
    sparsecomm simulate --calibration benchmarks/results/scale.json   # this machine's costs + fitted overhead
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

GPT2_124M = 124_439_808


def gpt2_matrices(n_layer: int = 12, d: int = 768, vocab: int = 50257, ctx: int = 1024) -> list[tuple[int, int]]:
    """GPT-2's weight matrices (what PowerSGD compresses; the vectors go dense)."""
    per_layer = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]
    return [(vocab, d), (ctx, d)] + per_layer * n_layer


@dataclass
class Calibration:
    """CPU seconds per element (N) or per sparse entry (k), one process, one thread, this machine."""

    select_per_elem: float  # threshold-reuse selection: one compare pass over |e|
    encode_per_entry: float  # framed message, raw int32 indices + bf16 values
    decode_per_entry: float
    apply_per_entry: float  # index_add_ into a dense buffer
    reduce_per_elem: float  # one fp32 add pass (a ring all-reduce's arithmetic, or applying a dense mean)
    matmul_flops: float  # fp32 GEMV/GEMM rate (PowerSGD's cost)
    encode_rice_per_entry: float = 0.0  # the same with Rice-coded indices
    decode_rice_per_entry: float = 0.0
    machine: str = ""


def calibrate(numel: int = 1 << 24, density: float = 0.01, repeat: int = 3) -> Calibration:
    """Measure the per-element costs in this process (one thread), best of `repeat`."""
    import torch

    from .codec import decode, encode, roundtrip_values
    from .compress import ThresholdReuse, k_for

    torch.set_num_threads(1)

    def best(fn):
        out, t = None, float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = fn()
            t = min(t, time.perf_counter() - t0)
        return t, out

    g = torch.Generator().manual_seed(0)
    x = torch.randn(numel, generator=g)
    k = k_for(numel, density)
    sel = ThresholdReuse()
    sel.select(x, k)  # estimate once: what follows is the reuse path
    t_sel, d = best(lambda: sel.select(x, k))
    d = roundtrip_values(d, "bf16")
    t_enc, buf = best(lambda: encode(d, "raw", "bf16"))
    t_dec, _ = best(lambda: decode(buf))
    t_enc_r, buf_r = best(lambda: encode(d, "rice", "bf16"))
    t_dec_r, _ = best(lambda: decode(buf_r))
    acc = torch.zeros(numel)
    t_app, _ = best(lambda: acc.index_add_(0, d.indices, d.values))
    y = torch.randn(numel, generator=g)
    t_red, _ = best(lambda: acc.add_(y))
    m = torch.randn(2048, 2048, generator=g)
    v = torch.randn(2048, 4, generator=g)
    t_mm, _ = best(lambda: m @ v)
    import platform

    return Calibration(select_per_elem=t_sel / numel, encode_per_entry=t_enc / d.k, decode_per_entry=t_dec / d.k,
                       apply_per_entry=t_app / d.k, reduce_per_elem=t_red / numel,
                       matmul_flops=2 * 2048 * 2048 * 4 / t_mm, encode_rice_per_entry=t_enc_r / d.k,
                       decode_rice_per_entry=t_dec_r / d.k, machine=platform.processor() or platform.machine())


@dataclass
class Link:
    gbps: float  # bandwidth, Gbit/s
    latency_s: float = 50e-6  # per message (one hop of a ring step)

    @property
    def bytes_per_s(self) -> float:
        return self.gbps * 1e9 / 8


def predict(path: str, numel: int, density: float, P: int, link: Link, cal: Calibration, *, cpu_share: float = 1.0,
            cpu_overhead: float = 1.0, value_bytes: int = 2, index: str = "raw", powersgd_rank: int = 1,
            matrices: list[tuple[int, int]] | None = None) -> dict:
    """Predicted seconds of one exchange on `path`: {"wire_s", "latency_s", "cpu_s", "total_s", "bytes"}.
    `cpu_overhead` scales the sparse paths' CPU terms: what the per-element costs leave out (framing,
    Python, the collectives' own CPU), fitted by benchmarks/bench_scale.py against measured CPU seconds."""
    B, a = link.bytes_per_s, link.latency_s
    k = max(1, round(density * numel))
    enc = cal.encode_rice_per_entry if index == "rice" else cal.encode_per_entry
    dec = cal.decode_rice_per_entry if index == "rice" else cal.decode_per_entry
    if index == "rice":  # index bits near the floor log2 C(N, k) / k
        idx_b = (math.lgamma(numel + 1) - math.lgamma(k + 1) - math.lgamma(numel - k + 1)) / math.log(2) / k / 8
    else:
        idx_b = 4.0
    b = idx_b + value_bytes
    if P == 1:
        return {"wire_s": 0.0, "latency_s": 0.0, "cpu_s": 0.0, "total_s": 0.0, "bytes": 0.0}
    if path == "dense":
        sent = 2 * (P - 1) / P * 4 * numel
        lat = 2 * (P - 1) * a
        cpu = cal.reduce_per_elem * numel * (1 + (P - 1) / P)  # the ring's adds + applying the mean
    elif path == "allgather":
        sent = (P - 1) * k * b
        lat = 2 * (P - 1) * a
        cpu = cal.select_per_elem * numel + enc * k + (dec + cal.apply_per_entry) * P * k
    elif path == "split":
        sent = 2 * (P - 1) / P * k * b
        lat = 4 * (P - 1) * a
        cpu = (cal.select_per_elem * numel * (1 + 1 / P) + enc * k * (1 + 1 / P)
               + (dec + cal.apply_per_entry) * k * 2)  # decode + accumulate as owner, decode + apply the result
    elif path == "powersgd":
        mats = matrices or gpt2_matrices()
        r = powersgd_rank
        rows, cols = sum(m for m, _ in mats), sum(n for _, n in mats)
        vec = max(0, numel - sum(m * n for m, n in mats))
        sent = 2 * (P - 1) / P * 4 * ((rows + cols) * r + vec)
        lat = 2 * 2 * (P - 1) * a
        cpu = 3 * 2 * sum(m * n for m, n in mats) * r / cal.matmul_flops + cal.reduce_per_elem * numel
    else:
        raise ValueError(f"unknown path {path!r}")
    wire = sent / B
    cpu *= cpu_share * (cpu_overhead if path in ("allgather", "split") else 1.0)
    return {"wire_s": wire, "latency_s": lat, "cpu_s": cpu, "total_s": wire + lat + cpu, "bytes": sent}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--numel", type=int, default=GPT2_124M, help="update size (default: GPT-2 124M)")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--P", type=int, nargs="+", default=[8, 64, 512], help="world sizes")
    p.add_argument("--links-gbps", type=float, nargs="+", default=[0.1, 1, 10, 100])
    p.add_argument("--latency-us", type=float, default=50.0, help="per-message latency (microseconds)")
    p.add_argument("--index", choices=["raw", "rice"], default="raw", help="index codec for the sparse paths")
    p.add_argument("--cpu-overhead", type=float, default=None,
                   help="factor on the sparse paths' CPU terms (default: the calibration file's fitted one, else 1)")
    p.add_argument("--calibration", type=Path, default=None,
                   help="JSON written by benchmarks/bench_scale.py (its 'calibration' key); default: measure now (~10 s)")


def run(args: argparse.Namespace) -> int:
    overhead = 1.0
    if args.calibration:
        try:
            data = json.loads(args.calibration.read_text())
            cal = Calibration(**data.get("calibration", data))
            overhead = float(data.get("cpu_overhead", 1.0))
        except (OSError, ValueError, TypeError, AttributeError) as e:
            print(f"sparsecomm simulate: cannot read a calibration from {args.calibration}: {e}")
            return 2
    else:
        print("calibrating on this machine (one process, one thread) ...", flush=True)
        cal = calibrate()
    if args.cpu_overhead is not None:
        overhead = args.cpu_overhead
    print(json.dumps({**asdict(cal), "cpu_overhead": overhead}))
    print(f"\none exchange of {args.numel:,} fp32 values at density {args.density:g}, a core per rank; "
          f"predicted seconds (wire + latency + CPU)\n")
    paths = ("dense", "allgather", "split", "powersgd")
    print(f"{'Gbit/s':>7} {'P':>5} " + " ".join(f"{p:>10}" for p in paths) + "  best")
    for gbps in args.links_gbps:
        link = Link(gbps, args.latency_us * 1e-6)
        for P in args.P:
            t = {p: predict(p, args.numel, args.density, P, link, cal, cpu_overhead=overhead, index=args.index)["total_s"]
                 for p in paths}
            print(f"{gbps:7g} {P:5d} " + " ".join(f"{t[p]:10.3f}" for p in paths) + f"  {min(t, key=t.get)}")
    return 0
