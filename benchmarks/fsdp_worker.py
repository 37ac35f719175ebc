"""One rank of benchmarks/bench_fsdp.py: a GPT-2-style LM under FSDP2 HSDP (R replicas x S shards).

    python benchmarks/fsdp_worker.py --mode ours --steps 6 --out rows.jsonl   (under torchrun: RANK, WORLD_SIZE, ...)

Modes (the same model, data and seeds):
    native_fp32   fully_shard over the 2-D ("replicate", "shard") mesh: native HSDP, fp32 reduction
    native_bf16   the same with MixedPrecisionPolicy(reduce_dtype=torch.bfloat16)
    ours          fully_shard over mesh["shard"] + install_sparse_hsdp(density) across mesh["replicate"]

Each run times `--steps` steps with the cross-replica reduction, then `--steps` steps with
`set_requires_all_reduce(False)` for the native modes (the issue's definition of native
cross-replica time: step time with it minus step time without, in the same run). Rows are the
slowest rank's seconds per step (max over ranks, measured after each step so it adds nothing to
it), this rank's CPU seconds, and for ours the hook's own wall time and the bytes it counted.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist


def build(mode: str, mesh, n_layer: int, n_embd: int, vocab: int, seq: int):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=n_embd, n_layer=n_layer,
                                       n_head=max(1, n_embd // 64)))
    over = mesh["shard"] if mode == "ours" else mesh
    kw = {"mp_policy": MixedPrecisionPolicy(reduce_dtype=torch.bfloat16)} if mode == "native_bf16" else {}
    for block in model.transformer.h:
        fully_shard(block, mesh=over, **kw)
    fully_shard(model, mesh=over, **kw)
    return model


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", required=True, choices=("native_fp32", "native_bf16", "ours"))
    ap.add_argument("--mesh", default="2x2")
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--n-layer", type=int, default=8)
    ap.add_argument("--n-embd", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--link", default="loopback")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from sparsecomm.dist_utils import shutdown_process_group
    from sparsecomm.integrations.fsdp import hsdp_mesh, install_sparse_hsdp

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = hsdp_mesh(a.mesh)
    model = build(a.mode, mesh, a.n_layer, a.n_embd, a.vocab, a.seq)
    numel = sum(p.numel() for p in model.parameters())
    local = sum(p.to_local().numel() for p in model.parameters())
    state = install_sparse_hsdp(model, mesh, density=a.density) if a.mode == "ours" else None
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    rows = []
    phases = [("with_all_reduce", True)] + ([("no_all_reduce", False)] if a.mode != "ours" else [])
    for phase, all_reduce in phases:
        model.set_requires_all_reduce(all_reduce)
        for i in range(a.warmup + a.steps):
            x = torch.randint(a.vocab, (a.batch, a.seq), generator=g)
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
            step_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
            m = state.last_metrics if state is not None else {}
            t = torch.tensor([step_s, m.get("timing/fsdp_hook_s", 0.0), cpu_s], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if i >= a.warmup:
                rows.append({"kind": "step", "mode": a.mode, "link": a.link, "phase": phase, "rank": rank,
                             "step_s": float(t[0]), "hook_s": float(t[1]), "cpu_s_max": float(t[2]), "cpu_s": cpu_s,
                             "sent_bytes": m.get("comm/sent_bytes"), "path": m.get("comm/path"),
                             "numel": numel, "local_numel": local, "world": world, "mesh": a.mesh})
    if rank == 0:
        with open(a.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    else:  # every rank's own counted bytes (they differ a little), kept beside rank 0's rows
        with open(f"{a.out}.rank{rank}", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    if state is not None:
        state.close()
    shutdown_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
