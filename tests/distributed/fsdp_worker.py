"""Scenarios of tests/distributed/test_fsdp.py, all run in one 4-rank gloo job (2 replicas x 2 shards).

Each scenario returns plain tensors / strings; `run_all` collects them per rank so the test module
spawns processes once (4 ranks on 2 cores: start-up dominates). Mesh [[0, 1], [2, 3]]: ranks 0 and
2 hold the same shard of different replicas.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from sparsecomm.integrations.fsdp import hsdp_mesh, install_sparse_hsdp, install_sparse_reduce_scatter

DIMS = ("replicate", "shard")


def make_model(mesh) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def backward(model, rank: int, step: int, micro: int = 0) -> None:
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    x, y = torch.randn(8, 32, generator=g), torch.randn(8, 8, generator=g)
    nn.functional.mse_loss(model(x), y).backward()


def train(model, rank: int, steps: int, first_step: int = 0, opt=None, accumulate: str = ""):
    """SGD steps; accumulate='sync' / 'all_reduce': two micro-steps, the first without gradient sync
    (set_requires_gradient_sync(False)) or without the cross-replica all-reduce (set_requires_all_reduce(False))."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(first_step, first_step + steps):
        if accumulate:
            off = model.set_requires_gradient_sync if accumulate == "sync" else model.set_requires_all_reduce
            off(False)
            backward(model, rank, step, micro=1)
            off(True)
        backward(model, rank, step)
        opt.step()
        opt.zero_grad()
    return opt


def full(model) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def spy_hook(state, record: dict) -> None:
    """record[key] = (this step's shards summed over micro-steps, the mean the hook left) around the real hook."""
    real, pending = state._all_reduce, {}

    def wrapped(key, module, shard):
        pending[key] = pending.get(key, 0) + shard.detach().float().clone().reshape(-1)
        syncs = all(pg.all_reduce_grads for pg in module._get_fsdp_state()._fsdp_param_groups)
        real(key, module, shard)
        if syncs:
            record[key] = (pending.pop(key), shard.detach().float().clone().reshape(-1))

    state._all_reduce = wrapped


def spy_reduce_scatter(state, record: dict) -> None:
    """record[key] = (unsharded input, owner's output) around the real reduce-scatter."""
    real = state._reduce_scatter

    def wrapped(key, out, inp, group, op):
        before = inp.detach().float().clone().reshape(-1)
        real(key, out, inp, group, op)
        record[key] = (before, out.detach().float().clone().reshape(-1))

    state._reduce_scatter = wrapped


def _hsdp_mesh():
    return init_device_mesh("cpu", (2, 2), mesh_dim_names=DIMS)


# ------------------------------------------------------------------ scenarios
def parity(rank):
    """density 1.0 vs native HSDP (plain, and both accumulation styles); forced sparse paths at fp32."""
    mesh, out = _hsdp_mesh(), {}
    for acc in ("", "sync", "all_reduce"):
        native = make_model(mesh)
        train(native, rank, 3, accumulate=acc)
        ours = make_model(mesh["shard"])
        state = install_sparse_hsdp(ours, mesh, density=1.0)
        train(ours, rank, 3, accumulate=acc)
        out[f"native{acc}"], out[f"ours{acc}"] = full(native), full(ours)
        out[f"path{acc}"] = state.last_metrics.get("comm/path")
        state.close()
    for paths in (("allgather",), ("split",)):
        ours = make_model(mesh["shard"])
        state = install_sparse_hsdp(ours, mesh, density=1.0, value_codec="fp32", paths=paths, exact=True)
        train(ours, rank, 3)
        out[f"forced_{paths[0]}"] = full(ours)
        out[f"forced_{paths[0]}_path"] = state.last_metrics.get("comm/path")
        state.close()
    return out


def sparse(rank):
    """1%: replicas bit-identical; applied mean x R + residuals = dense sum (also over accumulation)."""
    mesh, out = _hsdp_mesh(), {}
    rep = mesh["replicate"].get_group()
    for acc, paths in (("", ("dense", "allgather", "split")), ("all_reduce", ("split",))):
        model = make_model(mesh["shard"])
        state = install_sparse_hsdp(model, mesh, density=0.01, paths=paths)
        record: dict = {}
        spy_hook(state, record)
        train(model, rank, 1, accumulate=acc)
        metrics = state.last_metrics
        errs = []
        for key, (before, after) in record.items():
            dense_sum = before.clone()
            dist.all_reduce(dense_sum, group=rep)
            residual = state.ef.residuals[key].clone()
            split = state.exchange.keys[key]["split"]
            if split is not None and split.acc is not None:  # owner residual, in sum units, at its shard
                lo, hi = split.shard
                residual[lo:hi] += split.acc
            dist.all_reduce(residual, group=rep)
            errs.append(float((2 * after + residual - dense_sum).abs().max() / dense_sum.abs().max()))
        train(model, rank, 2, first_step=1, accumulate=acc)
        out[f"conservation{acc}"] = max(errs)
        out[f"full{acc}"] = full(model)
        out[f"metrics{acc}"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        out[f"local{acc}"] = [p.to_local().detach().clone() for p in model.parameters()]
        state.close()
    return out


def checkpoint(rank, root):
    """DCP save / resume bit-exact; other density refused; a native checkpoint loads with zero residuals."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    mesh, out = _hsdp_mesh(), {}
    model = make_model(mesh["shard"])
    state = install_sparse_hsdp(model, mesh, density=0.01)
    opt = train(model, rank, 2)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd, "sparsecomm": state.state_dict()}, checkpoint_id=f"{root}/ckpt")
    dcp.save({"model": msd}, checkpoint_id=f"{root}/native")
    train(model, rank, 2, first_step=2, opt=opt)
    out["reference"] = full(model)

    resumed = make_model(mesh["shard"])
    rstate = install_sparse_hsdp(resumed, mesh, density=0.01)
    ropt = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    msd, osd = get_state_dict(resumed, ropt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=f"{root}/ckpt")
    set_state_dict(resumed, ropt, model_state_dict=msd, optim_state_dict=osd)
    out["found"] = rstate.load_checkpoint(f"{root}/ckpt")
    train(resumed, rank, 2, first_step=2, opt=ropt)
    out["resumed"] = full(resumed)
    rstate.close()

    other = make_model(mesh["shard"])
    ostate = install_sparse_hsdp(other, mesh, density=0.02)
    try:
        ostate.load_checkpoint(f"{root}/ckpt")
        out["mismatch"] = ""
    except ValueError as e:
        out["mismatch"] = str(e)
    ostate.close()

    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("sparsecomm.fsdp").addHandler(handler)
    native = make_model(mesh["shard"])
    nstate = install_sparse_hsdp(native, mesh, density=0.01)
    out["native_found"] = nstate.load_checkpoint(f"{root}/native")
    out["native_residuals"] = len(nstate.ef.residuals)
    out["native_log"] = messages
    logging.getLogger("sparsecomm.fsdp").removeHandler(handler)
    nstate.close()
    return out


def refusals(rank):
    """Every bad configuration: (name, error text or '' when nothing was raised)."""
    mesh, out = _hsdp_mesh(), {}

    def attempt(name, fn):
        try:
            fn()
            out[name] = ""
        except (ValueError, RuntimeError) as e:
            out[name] = str(e)

    attempt("not_wrapped", lambda: install_sparse_hsdp(nn.Linear(4, 4), mesh))
    attempt("native_hsdp", lambda: install_sparse_hsdp(make_model(mesh), mesh))
    attempt("density_high", lambda: install_sparse_hsdp(make_model(mesh["shard"]), mesh, density=1.5))
    attempt("density_zero", lambda: install_sparse_hsdp(make_model(mesh["shard"]), mesh, density=0.0))
    attempt("disagree_density", lambda: install_sparse_hsdp(make_model(mesh["shard"]), mesh,
                                                            density=0.02 if rank == 1 else 0.01))
    attempt("disagree_codec", lambda: install_sparse_hsdp(make_model(mesh["shard"]), mesh,
                                                          value_codec="fp32" if rank == 3 else "bf16"))
    model = make_model(mesh["shard"])
    install_sparse_hsdp(model, mesh)
    attempt("twice", lambda: install_sparse_hsdp(model, mesh))
    attempt("mesh_world", lambda: hsdp_mesh("3x2"))
    attempt("mesh_spec", lambda: hsdp_mesh("two"))
    attempt("mesh_dims", lambda: install_sparse_hsdp(make_model(mesh["shard"]), init_device_mesh("cpu", (4,))))
    attempt("mesh_other", lambda: install_sparse_hsdp(make_model(mesh["replicate"]), mesh))
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    attempt("mesh_hosts", lambda: hsdp_mesh("1x4"))
    attempt("mesh_ok", lambda: hsdp_mesh("2x2"))
    del os.environ["LOCAL_WORLD_SIZE"]
    return out


def reduce_scatter(rank):
    """1-D FSDP over 4 ranks: the custom reduce-scatter at density 1.0 = default; 1% conserves mass."""
    mesh, out = init_device_mesh("cpu", (4,)), {}
    native = make_model(mesh)
    train(native, rank, 3)
    ours = make_model(mesh)
    state = install_sparse_reduce_scatter(ours, density=1.0)
    train(ours, rank, 3)
    out["native"], out["dense"] = full(native), full(ours)
    state.close()
    sparse_model = make_model(mesh)
    state = install_sparse_reduce_scatter(sparse_model, density=0.01)
    record: dict = {}
    spy_reduce_scatter(state, record)
    train(sparse_model, rank, 1)
    errs = []
    for key, (before, shard_mean) in record.items():
        total = before.clone()  # every rank's unsharded gradient, summed
        dist.all_reduce(total)
        n = shard_mean.numel()
        applied = torch.zeros_like(total)
        applied[rank * n:(rank + 1) * n] = shard_mean * 4  # owner's AVG x S = the sum of what was sent
        dist.all_reduce(applied)
        residual = state.ef.residuals[key].clone()
        dist.all_reduce(residual)
        errs.append(float((applied + residual - total).abs().max() / total.abs().max()))
    out["conservation"] = max(errs)
    out["metrics"] = {k: v for k, v in state.last_metrics.items() if isinstance(v, (int, float, str))}
    # a corrupt piece from rank 3: every rank raises the same clear error, none waits
    (tr,) = state._transports.values()
    real = tr.all_to_all_bytes
    if rank == 3:
        tr.all_to_all_bytes = lambda bufs: real([b[:-5] + b"junk!" if len(b) > 5 else b for b in bufs])
    try:
        train(sparse_model, rank, 1, first_step=1)
        out["corrupt"] = "no error"
    except Exception as err:  # noqa: BLE001 - reported to the test
        out["corrupt"] = f"{type(err).__name__}: {err}"
    tr.all_to_all_bytes = real
    state.close()
    out["resume"] = _reduce_scatter_resume(rank, mesh)
    return out


def _local_state(model) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {k: v.to_local().clone() if hasattr(v, "to_local") else v.clone() for k, v in get_model_state_dict(model).items()}


def _load_local_state(model, saved: dict) -> None:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    msd = get_model_state_dict(model)
    for k, v in msd.items():  # the saved local shards into the fresh model's sharded state dict
        (v.to_local() if hasattr(v, "to_local") else v).copy_(saved[k])
    set_model_state_dict(model, msd)


def _reduce_scatter_resume(rank, mesh) -> dict:
    """The 1-D sparse reduce-scatter at 5%: 2 steps, its state_dict (residuals, selectors) and the model's
    local shards saved, 2 more steps; a fresh model and state loaded from them run the same 2 steps."""
    def sgd(m):
        return torch.optim.SGD(m.parameters(), lr=0.1)  # stateless: the sparse state and the weights are all

    model = make_model(mesh)
    state = install_sparse_reduce_scatter(model, density=0.05)
    opt = train(model, rank, 2, opt=sgd(model))
    saved_model, saved_state = _local_state(model), state.state_dict()
    train(model, rank, 2, first_step=2, opt=opt)
    reference = full(model)
    state.close()
    resumed = make_model(mesh)
    rstate = install_sparse_reduce_scatter(resumed, density=0.05)
    _load_local_state(resumed, saved_model)
    rstate.load_state_dict(saved_state)
    train(resumed, rank, 2, first_step=2, opt=sgd(resumed))
    rstate.close()
    return {"reference": reference, "resumed": full(resumed), "selectors": len(rstate.selectors)}


def sharded_aspg(rank):
    """ShardedASPG on the 2x2 mesh at density 1 and 1%: weights after 3 steps (full and local shards), the
    last step's metrics, and the refusal of a natively 2-D sharded model."""
    from sparsecomm.integrations.fsdp import ShardedASPG

    mesh, out = _hsdp_mesh(), {}
    for density in (1.0, 0.01):
        model = make_model(mesh["shard"])
        opt = ShardedASPG(model, mesh, lr=1e-2, density=density)
        before = full(model)
        train(model, rank, 3, opt=opt)
        out[f"d{density}"] = {"full": full(model), "before": before,
                              "local": [p.to_local().detach().clone() for p in model.parameters()],
                              "metrics": {k: v for k, v in opt.last_metrics.items() if isinstance(v, (int, float, str))}}
    out["resume"] = _sharded_aspg_resume(rank, mesh)
    try:
        ShardedASPG(make_model(mesh), mesh, lr=1e-2)  # native 2-D HSDP: refused
        out["refused_native"] = ""
    except ValueError as e:
        out["refused_native"] = str(e)
    return out


def _sharded_aspg_resume(rank, mesh) -> dict:
    """ShardedASPG at 1% (split path, bf16 values): 2 steps, checkpoint (the model through DCP's sharded
    state dict, ASPG's state per rank), 2 more steps; a fresh model and optimizer loaded from the checkpoint
    run the same 2 steps. The weights must match bit for bit (residuals, moments, selector and split state
    restored, and the optimizer still updating the loaded shards in place)."""
    import io

    from sparsecomm.integrations.fsdp import ShardedASPG

    kwargs = dict(lr=1e-2, density=0.01, paths=("split",), rebalance_every=3)  # rebalances after the resume
    model = make_model(mesh["shard"])
    opt = ShardedASPG(model, mesh, **kwargs)
    train(model, rank, 2, opt=opt)
    saved_model = _local_state(model)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    train(model, rank, 2, first_step=2, opt=opt)
    reference = full(model)

    resumed = make_model(mesh["shard"])
    ropt = ShardedASPG(resumed, mesh, **kwargs)
    _load_local_state(resumed, saved_model)
    buf.seek(0)
    ropt.load_state_dict(torch.load(buf, weights_only=False))
    train(resumed, rank, 2, first_step=2, opt=ropt)
    return {"reference": reference, "resumed": full(resumed), "path": ropt.last_metrics.get("comm/path", ""),
            "fresh": full(make_model(mesh["shard"]))}


def run_all(rank, world_size, root):
    torch.use_deterministic_algorithms(True)
    results = {}
    for fn in (parity, sparse, refusals, reduce_scatter, sharded_aspg):
        results[fn.__name__] = fn(rank)
    results["checkpoint"] = checkpoint(rank, root)
    return results
