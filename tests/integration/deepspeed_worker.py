"""Worker for tests/integration/test_deepspeed.py: every DeepSpeed check of one 2-rank gloo run.

DeepSpeed's import and each engine's set-up cost seconds, so one spawn runs all the scenarios
and returns what the test process compares (weights per rank, reduction records).
"""
from __future__ import annotations

import os

import torch

STEPS = 3


def tiny_model(seed: int = 0, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8)).to(dtype)


def batch(rank: int, step: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(4, 16, generator=g).to(dtype), torch.randn(4, 8, generator=g).to(dtype)


def loss_of(model, x, y):
    return torch.nn.functional.mse_loss(model(x).float(), y.float())


def config(stage: int, bf16: bool = False, **zero) -> dict:
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
            "zero_optimization": {"stage": stage, **zero}, "bf16": {"enabled": bf16},
            "zero_allow_untested_optimizer": True, "wall_clock_breakdown": False,
            "gradient_clipping": 0.0}  # DeepSpeed 0.19.8 clips at 1.0 unless told; our ASPG loop does not clip


def adamw_config(stage: int, bf16: bool = False) -> dict:
    # ZeRO-2 with small buckets: several buckets per step, each with its own residual
    cfg = config(stage, bf16, **({"reduce_bucket_size": 200} if stage == 2 else {}))
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01, "torch_adam": True}}
    return cfg


def weights(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def train(engine, rank: int, steps: int, start: int = 0, dtype=torch.float32) -> None:
    for s in range(start, start + steps):
        x, y = batch(rank, s, dtype)
        engine.backward(loss_of(engine, x, y))
        engine.step()


def aspg(params, **kw):
    from sparsecomm.exchange.torch_dist import TorchDistTransport
    from sparsecomm.optim.aspg import ASPG

    return ASPG(params, lr=1e-2, weight_decay=0.01, density=0.05, transport=TorchDistTransport(), **kw)


def aspg_scenarios(rank: int) -> dict:
    """ZeRO-0 with ASPG (fp32, bf16) against plain ASPG on the same data; checkpoint resume."""
    from sparsecomm.integrations import deepspeed as sds

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ref = tiny_model(dtype=dtype)
        ref_opt = aspg(ref.parameters())
        for s in range(STEPS):  # our own ASPG loop: backward, step, zero_grad
            x, y = batch(rank, s, dtype)
            loss_of(ref, x, y).backward()
            ref_opt.step()
            ref_opt.zero_grad()
        model = tiny_model(dtype=dtype)
        engine = sds.initialize(model, config(0), optimizer=aspg(model.parameters()), comm="aspg")
        train(engine, rank, STEPS, dtype=dtype)
        out[f"aspg0_{name}"] = {"ds": weights(engine.module), "ref": weights(ref),
                                "allreduce_on": engine.enable_backward_allreduce,
                                "path": engine.optimizer.last_metrics.get("comm/path")}
    # resume: 2 steps, save, 2 steps (reference) vs a fresh engine loading the checkpoint, 2 steps
    ckpt = os.environ["SPARSECOMM_DS_CKPT"]
    model = tiny_model()
    engine = sds.initialize(model, config(0), optimizer=aspg(model.parameters()), comm="aspg")
    train(engine, rank, 2)
    sds.save_checkpoint(engine, ckpt, tag="t2")
    train(engine, rank, 2, start=2)
    model2 = tiny_model(seed=5)  # different initial weights: everything must come from the checkpoint
    engine2 = sds.initialize(model2, config(0), optimizer=aspg(model2.parameters()), comm="aspg")
    sds.load_checkpoint(engine2, ckpt, tag="t2")
    train(engine2, rank, 2, start=2)
    out["aspg0_resume"] = {"ref": weights(engine.module), "resumed": weights(engine2.module)}
    return out


def sparse_grad_scenarios(rank: int) -> dict:
    """AdamW with DeepSpeed's reduction dense vs compressed (density 1.0 and 1%), ZeRO-0/1/2, resume."""
    from sparsecomm.integrations import deepspeed as sds

    out = {}
    for stage in (0, 1, 2):
        dense = sds.initialize(tiny_model(), adamw_config(stage), comm="dense")
        train(dense, rank, STEPS)
        full = sds.initialize(tiny_model(), adamw_config(stage), comm="sparse_grad",
                              state=sds.SparseReduceState(density=1.0))
        train(full, rank, STEPS)
        out[f"z{stage}_density1"] = {"dense": weights(dense.module), "sparse": weights(full.module)}

        state = sds.SparseReduceState(density=0.01, paths=("allgather",))
        records = []
        inner = state.reduce_

        def recording_reduce(key, tensor, inner=inner, state=state):
            before = tensor.detach().float().clone()  # step 1: the residual is still empty, so e = grad
            result = inner(key, tensor)
            if state.steps == 0:
                records.append({"key": key, "grad": before, "mean": result.detach().float().clone(),
                                "residual": state.ef.residuals[key].clone()})
            return result

        state.reduce_ = recording_reduce
        sparse = sds.initialize(tiny_model(), adamw_config(stage), comm="sparse_grad", state=state)
        train(sparse, rank, STEPS)
        out[f"z{stage}_density001"] = {"weights": weights(sparse.module), "records": records,
                                       "metrics": dict(state.last_metrics), "dense_final": weights(dense.module)}
    # bf16 ZeRO-1 with fp32 gradient accumulation (DeepSpeed's BF16_Optimizer: the engine's allreduce_bucket)
    state = sds.SparseReduceState(density=0.01)
    cfg = {**adamw_config(1, bf16=True), "data_types": {"grad_accum_dtype": "fp32"}}
    eng = sds.initialize(tiny_model(), cfg, comm="sparse_grad", state=state)
    train(eng, rank, STEPS, dtype=torch.bfloat16)
    out["z1_bf16_density001"] = {"weights": weights(eng.module), "optimizer": type(eng.optimizer).__name__,
                                 "metrics": dict(state.last_metrics)}
    # resume with residuals (ZeRO-2)
    ckpt = os.environ["SPARSECOMM_DS_CKPT"] + "_z2"
    eng = sds.initialize(tiny_model(), adamw_config(2), comm="sparse_grad", state=sds.SparseReduceState(density=0.05))
    train(eng, rank, 2)
    sds.save_checkpoint(eng, ckpt, tag="t2")
    train(eng, rank, 2, start=2)
    eng2 = sds.initialize(tiny_model(seed=5), adamw_config(2), comm="sparse_grad",
                          state=sds.SparseReduceState(density=0.05))
    sds.load_checkpoint(eng2, ckpt, tag="t2")
    train(eng2, rank, 2, start=2)
    out["z2_resume"] = {"ref": weights(eng.module), "resumed": weights(eng2.module)}
    out.update(sparse_param_gather_scenarios(rank))
    return out


def masters(engine) -> torch.Tensor:
    """This rank's fp32 master partitions (DeepSpeedZeroOptimizer), concatenated."""
    return torch.cat([p.detach().view(-1).clone() for p in engine.optimizer.single_partition_of_fp32_groups])


def sparse_param_gather_scenarios(rank: int) -> dict:
    """ZeRO-1/2 with the all-gather of updated partitions sparse too (param_density)."""
    from sparsecomm.integrations import deepspeed as sds

    out = {}
    for stage in (1, 2):
        dense = sds.initialize(tiny_model(), adamw_config(stage), comm="dense")
        train(dense, rank, STEPS)
        full = sds.initialize(tiny_model(), adamw_config(stage), comm="sparse_grad",
                              state=sds.SparseReduceState(density=1.0, param_density=1.0))
        train(full, rank, STEPS)
        state = sds.SparseReduceState(density=0.05, param_density=0.05)
        eng = sds.initialize(tiny_model(), adamw_config(stage), comm="sparse_grad", state=state)
        train(eng, rank, STEPS)
        lagging = weights(eng.module)
        lag = masters(eng) - torch.cat([h.view(-1).float() for h in state.param_gather.held])
        metrics = dict(state.last_metrics)
        for g in eng.optimizer.optimizer.param_groups:  # the masters stop moving; the published copies catch up
            g["lr"] = 0.0
        train(eng, rank, 21, start=STEPS)  # 5% per step: every entry sent within 20 steps
        caught_up = torch.cat([h.view(-1).float() for h in state.param_gather.held])
        out[f"z{stage}_params005"] = {"dense": weights(dense.module), "full": weights(full.module),
                                      "lagging": lagging, "lag_nonzero": int((lag != 0).sum()),
                                      "caught_up_equals_masters": bool(torch.equal(caught_up, masters(eng))),
                                      "metrics": metrics, "final": weights(eng.module)}
    # bf16 ZeRO-2 (DeepSpeedZeroOptimizer with bf16 weights, fp32 masters): the published copies are bf16
    dense = sds.initialize(tiny_model(), adamw_config(2, bf16=True), comm="dense")
    train(dense, rank, STEPS, dtype=torch.bfloat16)
    full = sds.initialize(tiny_model(), adamw_config(2, bf16=True), comm="sparse_grad",
                          state=sds.SparseReduceState(density=1.0, param_density=1.0))
    train(full, rank, STEPS, dtype=torch.bfloat16)
    state = sds.SparseReduceState(density=0.05, param_density=0.05)
    eng = sds.initialize(tiny_model(), adamw_config(2, bf16=True), comm="sparse_grad", state=state)
    train(eng, rank, STEPS, dtype=torch.bfloat16)
    lagging = weights(eng.module)
    lag = masters(eng).to(torch.bfloat16) != torch.cat([h.view(-1) for h in state.param_gather.held])
    for g in eng.optimizer.optimizer.param_groups:
        g["lr"] = 0.0
    train(eng, rank, 21, start=STEPS, dtype=torch.bfloat16)
    caught_up = torch.cat([h.view(-1) for h in state.param_gather.held])
    out["z2_bf16_params005"] = {"dense": weights(dense.module), "full": weights(full.module), "lagging": lagging,
                                "lag_nonzero": int(lag.sum()), "held_dtype": str(caught_up.dtype),
                                "caught_up_equals_masters": bool(torch.equal(caught_up, masters(eng).to(torch.bfloat16))),
                                "final": weights(eng.module), "metrics": dict(state.last_metrics)}
    ckpt = os.environ["SPARSECOMM_DS_CKPT"] + "_z2p"
    make = lambda seed=0: sds.initialize(tiny_model(seed=seed), adamw_config(2), comm="sparse_grad",  # noqa: E731
                                         state=sds.SparseReduceState(density=0.05, param_density=0.05))
    eng = make()
    train(eng, rank, 2)
    sds.save_checkpoint(eng, ckpt, tag="t2")
    train(eng, rank, 2, start=2)
    eng2 = make(seed=5)
    sds.load_checkpoint(eng2, ckpt, tag="t2")
    train(eng2, rank, 2, start=2)
    out["z2_params_resume"] = {"ref": weights(eng.module), "resumed": weights(eng2.module)}
    return out


def zero3_rollout_scenario(rank: int, endpoint: str, relay_endpoint: str) -> dict:
    """ZeRO-3 AdamW: every version each rank publishes its partition's changed bf16 entries, to a
    direct subscriber (`endpoint`, a PULL socket) and through a relay coordinator (`relay_endpoint`);
    at the end a gathered bf16 reference (the full model, gathered only here, for the comparison)."""
    import deepspeed

    from sparsecomm.integrations import deepspeed as sds

    eng = sds.initialize(tiny_model(), adamw_config(3), comm="dense")
    sender = sds.ZmqPatchSender(endpoint)
    pub = sds.Zero3RolloutPublisher(eng, sender)
    relay = sds.relay_publisher(eng, relay_endpoint, timeout_s=60)
    sent, relayed = [pub.publish()], [relay.publish()]  # version 1: the anchor
    for s in range(STEPS):
        train(eng, rank, 1, start=s)
        sent.append(pub.publish())
        relayed.append(relay.publish())
    sender.close()
    relay.send.close()
    with deepspeed.zero.GatheredParameters(list(eng.module.parameters())):
        ref = {name: p.detach().to(torch.bfloat16).clone() for name, p in eng.module.named_parameters()}
    numel = sum(p.ds_numel for p in eng.module.parameters())
    return {"sent": sent, "relayed": relayed, "ref": ref, "held_bytes": pub.held_bytes, "peak_temp_bytes": pub.peak_temp_bytes,
            "model_numel": numel, "max_partition": max(p.ds_tensor.ds_numel for p in eng.module.parameters())}


def run_all(rank: int, world_size: int, ckpt_dir: str, endpoint: str, relay_endpoint: str) -> dict:
    import deepspeed

    os.environ["SPARSECOMM_DS_CKPT"] = ckpt_dir
    # what the deepspeed / torchrun launchers set; DeepSpeed's engine asserts LOCAL_RANK
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world_size))
    deepspeed.init_distributed(dist_backend="gloo")
    return {**aspg_scenarios(rank), **sparse_grad_scenarios(rank), "zero3": zero3_rollout_scenario(rank, endpoint, relay_endpoint)}
