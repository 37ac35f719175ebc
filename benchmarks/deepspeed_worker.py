"""One rank of benchmarks/bench_deepspeed.py: every DeepSpeed configuration in one process, same run.

For each ZeRO stage: DeepSpeed's own dense path, then the same steps with sparsecomm's
communication at `--density` (ZeRO-0: ASPG and the compressed reduction; ZeRO-1/2: the
compressed reduction with AdamW, alone and with the sparse all-gather of the updated partitions
(param_density = density); ZeRO-3: dense training plus the shard-local rollout sync).
Bytes per step:
  - DeepSpeed's collectives: every call through deepspeed.comm's backend is counted, per rank,
    with the ring model of its tensor size (all_reduce 2(P-1)/P n b; reduce, reduce_scatter and
    all_gather (P-1)/P n b; broadcast n b) - counted from the tensors DeepSpeed passed;
  - sparsecomm's exchange: the encoded buffers it sent (comm/sent_bytes), headers included.
Rows go to --out as JSON lines (rank 0 writes; every rank's CPU seconds are gathered).
"""
from __future__ import annotations

import argparse
import json
import os
import hashlib
import resource
import time

import torch
import torch.distributed as dist


class CollectiveBytes:
    """Wraps deepspeed.comm's backend (cdb) methods: bytes each collective DeepSpeed issued would send."""

    RING = {"all_reduce": lambda n, P: 2 * (P - 1) / P * n, "reduce": lambda n, P: (P - 1) / P * n,
            "reduce_scatter_tensor": lambda n, P: (P - 1) / P * n, "all_gather_into_tensor": lambda n, P: (P - 1) / P * n,
            "broadcast": lambda n, P: n}

    def __init__(self):
        from deepspeed.comm import comm as dscomm

        self.total = 0.0
        self.by_op: dict[str, float] = {}  # the same, per collective
        cdb = dscomm.cdb
        for name, model in self.RING.items():
            inner = getattr(cdb, name)
            setattr(cdb, name, self._counting(inner, name, model))

    def _counting(self, inner, name, model):
        def call(*args, **kwargs):
            # the tensor that sets the volume: an all-gather's output, a reduce-scatter's input, else the tensor
            key, pos = {"all_gather_into_tensor": ("output_tensor", 0),
                        "reduce_scatter_tensor": ("input_tensor", 1)}.get(name, ("tensor", 0))
            t = kwargs[key] if key in kwargs else args[pos]
            group = kwargs.get("group")
            P = dist.get_world_size(group)
            n = model(t.numel() * t.element_size(), P)
            self.total += n
            self.by_op[name] = self.by_op.get(name, 0.0) + n
            return inner(*args, **kwargs)

        return call


def model_of(hidden: int, layers: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    mods = []
    for _ in range(layers):
        mods += [torch.nn.Linear(hidden, hidden), torch.nn.Tanh()]
    return torch.nn.Sequential(*mods)


def cfg(stage: int, optimizer: bool, lr: float = 1e-3) -> dict:
    c = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
         "steps_per_print": 10 ** 9, "zero_optimization": {"stage": stage, "reduce_bucket_size": 50_000_000},
         "zero_allow_untested_optimizer": True}
    if optimizer:
        c["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "torch_adam": True}}
    return c


def run_steps(engine, rank: int, hidden: int, steps: int, counter: CollectiveBytes, state=None, pub=None) -> dict:
    """Steps after one warm-up step: DeepSpeed's bytes, sparsecomm's bytes, wall and CPU seconds, per step."""
    ds_bytes, sc_bytes, wall, cpu, sync, losses, by_op = [], [], [], [], [], [], {}
    for s in range(steps + 1):
        g = torch.Generator().manual_seed(1000 * rank + s)
        x, y = torch.randn(8, hidden, generator=g), torch.randn(8, hidden, generator=g)
        b0, t0, c0 = counter.total, time.perf_counter(), time.process_time()
        ops0 = dict(counter.by_op)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        losses.append(float(loss.detach()))
        engine.backward(loss)
        engine.step()
        if s == 0:
            if pub is not None:
                pub.publish()  # the anchor (whole partition) is version 1; versions after it are measured
            continue
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        ds_bytes.append(counter.total - b0)
        for op, n in counter.by_op.items():
            by_op[op] = by_op.get(op, 0.0) + (n - ops0.get(op, 0.0)) / steps
        sc_bytes.append(float(state.last_metrics.get("comm/sent_bytes", 0)) if state is not None else 0.0)
        if pub is not None:
            sync.append(pub.publish())
    out = {"ds_bytes_per_step": sum(ds_bytes) / steps, "ds_bytes_per_step_by_op": by_op, "sparsecomm_bytes_per_step": sum(sc_bytes) / steps,
           "step_s": sorted(wall)[len(wall) // 2], "cpu_s_per_step": sum(cpu) / steps, "loss_last": losses[-1]}
    if state is not None:
        out["path"] = state.last_metrics.get("comm/path")
    if pub is not None:
        out["sync_bytes_per_version"] = sum(v["sent_bytes"] for v in sync) / len(sync)
        out["sync_changed_entries_per_version"] = sum(v["changed_entries"] for v in sync) / len(sync)
        out["sync_held_bytes"] = pub.held_bytes
        out["sync_peak_temp_bytes"] = pub.peak_temp_bytes
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--master", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--relay", required=True, help="endpoint of the relay coordinator the ZeRO-3 runs publish to")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.update(RANK=str(a.rank), LOCAL_RANK=str(a.rank), WORLD_SIZE=str(a.world), MASTER_ADDR=a.master,
                      MASTER_PORT=str(a.port))
    import deepspeed

    from sparsecomm.exchange.torch_dist import TorchDistTransport
    from sparsecomm.integrations import deepspeed as sds
    from sparsecomm.optim.aspg import ASPG

    deepspeed.init_distributed(dist_backend="gloo")
    counter = CollectiveBytes()
    numel = sum(p.numel() for p in model_of(a.hidden, a.layers).parameters())
    rows = []

    def record(stage, mode, res):
        res = {"stage": stage, "mode": mode, "world": a.world, "numel": numel, "density": a.density, **res}
        cpu = torch.tensor([res["cpu_s_per_step"]], dtype=torch.float64)
        gathered = [torch.zeros_like(cpu) for _ in range(a.world)]
        dist.all_gather(gathered, cpu)
        res["cpu_s_per_step_per_rank"] = [float(t) for t in gathered]
        res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        rows.append(res)
        if a.rank == 0:
            print(f"  P={a.world} ZeRO-{stage} {mode}: {res['ds_bytes_per_step'] + res['sparsecomm_bytes_per_step']:,.0f} "
                  f"B/step, step {res['step_s']:.3f} s", flush=True)

    for stage in (0, 1, 2, 3):
        dense = sds.initialize(model_of(a.hidden, a.layers), cfg(stage, True), comm="dense")
        # ZeRO-3: each version through the relay coordinator to its rollout worker (the benchmark's process)
        pub = sds.relay_publisher(dense, a.relay) if stage == 3 else None
        record(stage, "deepspeed_dense", run_steps(dense, a.rank, a.hidden, a.steps, counter, pub=pub))
        if pub is not None:
            pub.send.close()
            with deepspeed.zero.GatheredParameters(list(dense.module.parameters())):  # the reference, after the row
                ref = torch.cat([p.detach().reshape(-1).to(torch.bfloat16) for p in dense.module.parameters()])
            rows[-1]["gathered_bf16_sha256"] = hashlib.sha256(ref.view(torch.int16).numpy().tobytes()).hexdigest()
            del ref
        del dense, pub
        if stage == 3:  # at an RL learning rate (DESIGN.md: 1e-6..3e-6) far fewer bf16 entries change per step
            dense = sds.initialize(model_of(a.hidden, a.layers), cfg(3, True, lr=3e-6), comm="dense")
            pub = sds.Zero3RolloutPublisher(dense, lambda payload, version, rank: None)  # patch sizes only
            record(3, "deepspeed_dense_lr3e-6", run_steps(dense, a.rank, a.hidden, a.steps, counter, pub=pub))
            del dense, pub
        if stage <= 2:
            state = sds.SparseReduceState(density=a.density)
            eng = sds.initialize(model_of(a.hidden, a.layers), cfg(stage, True), comm="sparse_grad", state=state)
            record(stage, "sparse_grad", run_steps(eng, a.rank, a.hidden, a.steps, counter, state=state))
            del eng
        if stage in (1, 2):  # the all-gather of the updated partitions sparse too
            state = sds.SparseReduceState(density=a.density, param_density=a.density)
            eng = sds.initialize(model_of(a.hidden, a.layers), cfg(stage, True), comm="sparse_grad", state=state)
            record(stage, "sparse_grad+params", run_steps(eng, a.rank, a.hidden, a.steps, counter, state=state))
            del eng
        if stage == 0:
            m = model_of(a.hidden, a.layers)
            opt = ASPG(m.parameters(), lr=1e-3, density=a.density, transport=TorchDistTransport())
            eng = sds.initialize(m, cfg(0, False), optimizer=opt, comm="aspg")
            record(0, "aspg", run_steps(eng, a.rank, a.hidden, a.steps, counter, state=opt))
            del eng
    if a.rank == 0:
        with open(a.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
