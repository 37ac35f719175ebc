"""`sparsecomm demo`: one worker's compression pipeline on a GPT-2-124M-sized update.

What it runs (stage by stage, each timed):

    u = random update (124,439,808 fp32 values, Adam-like magnitudes)
    e = ef.compensate(u)              error feedback
    d = selector.select(e, k)         top-k by |e| (sampled threshold by default)
    d = roundtrip_values(d, value)    what receivers will decode
    ef.update(d)                      residual = e - d
    buf = encode(d)                   the bytes that would be sent, header included
    decode(buf) -> apply to weights

and prints bytes vs dense fp32/bf16, bits per index vs the information floor log2 C(n, k),
and time per stage. Random data puts the top-k at uniformly random positions, the hardest case
for index coding. The full RL demo (multi-worker GRPO) replaces this once the RL loop lands.

    sparsecomm demo --density 0.01 --value bf16
"""
from __future__ import annotations

import argparse
import time

import torch

from .codec import decode, encode, information_floor_bits, roundtrip_values
from .compress import ErrorFeedback, k_for, make_selector

GPT2_124M_NUMEL = 124_439_808


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--numel", type=int, default=GPT2_124M_NUMEL, help="update size (default: GPT-2 124M)")
    p.add_argument("--density", type=float, default=0.01, help="fraction of entries sent (default 0.01)")
    p.add_argument("--selector", default="sampled", help="topk | sampled | chunked | randomk (default sampled)")
    p.add_argument("--index", default="auto", help="index codec: auto | raw | bitmap | varint | rice")
    p.add_argument("--value", default="bf16", help="value codec: fp32 | bf16 | fp16 | int8 (default bf16)")
    p.add_argument("--steps", type=int, default=3, help="steps to run (error feedback carries over)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    n, k = args.numel, k_for(args.numel, args.density)
    print(f"sparsecomm demo: one worker, {n:,} fp32 values (GPT-2-124M-sized), density {args.density:g} (k={k:,}), "
          f"selector={args.selector}, index={args.index}, value={args.value}, torch threads={torch.get_num_threads()}")
    weights = torch.zeros(n)
    ef, selector = ErrorFeedback(), make_selector(args.selector)
    dense_fp32, dense_bf16 = 4 * n, 2 * n
    for step in range(args.steps):
        t = {}
        t0 = time.perf_counter()
        u = torch.randn(n).mul_(1e-3)  # stand-in for an Adam-style update
        t["make_update_s"] = time.perf_counter() - t0
        t0 = time.perf_counter(); e = ef.compensate("w", u); t["compensate_s"] = time.perf_counter() - t0
        t0 = time.perf_counter(); d = selector.select(e, k); t["select_s"] = time.perf_counter() - t0
        d.step = step
        t0 = time.perf_counter()
        d = roundtrip_values(d, args.value)
        ef.update("w", d)
        t["feedback_update_s"] = time.perf_counter() - t0
        t0 = time.perf_counter(); buf = encode(d, args.index, args.value); t["encode_s"] = time.perf_counter() - t0
        t0 = time.perf_counter(); got = decode(buf); t["decode_s"] = time.perf_counter() - t0
        t0 = time.perf_counter(); got.add_to(weights); t["apply_s"] = time.perf_counter() - t0
        assert torch.equal(got.indices, d.indices) and torch.equal(got.values, d.values), "round trip failed"
        sent_bytes = len(buf)
        floor_bits = information_floor_bits(n, d.k)
        value_bytes = d.k * {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}[args.value]
        index_bits = (sent_bytes - value_bytes) * 8  # header counted against the indices: conservative
        print(f"\nstep {step}: sent k={d.k:,} entries in {sent_bytes:,} bytes (header included)")
        print(f"  vs dense fp32 {dense_fp32:,} B: {dense_fp32 / sent_bytes:7.1f}x smaller")
        print(f"  vs dense bf16 {dense_bf16:,} B: {dense_bf16 / sent_bytes:7.1f}x smaller")
        print(f"  index bits/entry {index_bits / d.k:.3f} vs floor log2 C(n,k)/k = {floor_bits / d.k:.3f} "
              f"({index_bits / floor_bits:.4f}x the floor, header included)")
        print(f"  residual |e| after step: {float(ef.residual('w').abs().sum()):.4g} (carried to the next step)")
        print("  time: " + "  ".join(f"{name}={sec * 1000:.0f}ms" for name, sec in t.items()))
    return 0
