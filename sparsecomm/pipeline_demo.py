"""`sparsecomm demo`: one worker's compression pipeline on a GPT-2-124M-sized update.

What it runs: the exchange every caller uses (`exchange.pipeline.SparseExchange`, here with one
worker, so the "transport" hands the encoded message straight back), stage by stage, each timed:

    u = random update (124,439,808 fp32 values, Adam-like magnitudes)
    e += u                            error feedback: the residual holds what was not sent yet
    d = select(e, k)                  top-k by |e| (threshold reuse by default)
    d = roundtrip(d, value)           what receivers will decode
    buf = encode(d)                   the bytes that would be sent, header included
    decode(buf) -> apply to weights;  e -= d  (only once the exchange succeeded)

and prints bytes vs dense fp32/bf16, bits per index vs the information floor log2 C(n, k),
and time per stage. Random data puts the top-k at uniformly random positions, the hardest case
for index coding.

    sparsecomm demo --density 0.01 --value bf16
"""
from __future__ import annotations

import argparse
import time

import torch

from .codec import VALUE_CODECS, information_floor_bits
from .compress import k_for
from .exchange import DenseSink, SparseExchange
from .track.comm import CommTracker

GPT2_124M_NUMEL = 124_439_808


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--numel", type=int, default=GPT2_124M_NUMEL, help="update size (default: GPT-2 124M)")
    p.add_argument("--density", type=float, default=0.01, help="fraction of entries sent (default 0.01)")
    p.add_argument("--selector", default="reuse", help="topk | sampled | reuse | chunked | randomk (default reuse)")
    p.add_argument("--index", default="auto", help="index codec: auto | raw | bitmap | varint | rice")
    p.add_argument("--value", default="bf16", help="value codec: fp32 | bf16 | fp16 | int8 (default bf16)")
    p.add_argument("--steps", type=int, default=3, help="steps to run (error feedback carries over)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    n, k = args.numel, k_for(args.numel, args.density)
    print(f"sparsecomm demo: one worker, {n:,} fp32 values (GPT-2-124M-sized), density {args.density:g} (k={k:,}), "
          f"selector={args.selector}, index={args.index}, value={args.value}, torch threads={torch.get_num_threads()}")
    weights, e = torch.zeros(n), torch.zeros(n)
    comm = CommTracker()
    ex = SparseExchange(selector=args.selector, index_codec=args.index, value_codec=args.value, paths=("allgather",),
                        seed=args.seed, comm=comm)
    dense_fp32, dense_bf16 = 4 * n, 2 * n
    for step in range(args.steps):
        t0 = time.perf_counter()
        u = torch.randn(n).mul_(1e-3)  # stand-in for an Adam-style update
        make_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        e.add_(u)
        compensate_s = time.perf_counter() - t0
        before = weights.clone() if step == 0 else None
        ex.exchange("w", e, k, DenseSink(weights))
        m = comm.collect(n, 4, 1)
        if before is not None:  # one-worker mean = the delta itself: weights moved by exactly what left e
            assert torch.equal(weights - before + e, u), "error feedback lost mass"
        sent_bytes, sent_k = m["comm/payload_bytes"], m["comm/k"]
        floor_bits = information_floor_bits(n, sent_k)
        value_bytes = sent_k * VALUE_CODECS[args.value].bytes_per_value
        index_bits = (sent_bytes - value_bytes) * 8  # header counted against the indices: conservative
        print(f"\nstep {step}: sent k={sent_k:,} entries in {sent_bytes:,} bytes (header included)")
        print(f"  vs dense fp32 {dense_fp32:,} B: {dense_fp32 / sent_bytes:7.1f}x smaller")
        print(f"  vs dense bf16 {dense_bf16:,} B: {dense_bf16 / sent_bytes:7.1f}x smaller")
        print(f"  index bits/entry {index_bits / sent_k:.3f} vs floor log2 C(n,k)/k = {floor_bits / sent_k:.3f} "
              f"({index_bits / floor_bits:.4f}x the floor, header included; codec {m['comm/index_codec']})")
        print(f"  residual |e| after step: {float(e.abs().sum()):.4g} (carried to the next step)")
        stages = {"make_update": make_s, "compensate": compensate_s,
                  **{ph: m.get(f"timing/{ph}_s", 0.0) for ph in ("select", "encode", "decode", "apply")}}
        print("  time: " + "  ".join(f"{name}={sec * 1000:.0f}ms" for name, sec in stages.items()))
    return 0
