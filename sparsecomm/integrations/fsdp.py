"""Sparse error-feedback compression of FSDP2's gradient reduction, through torch's own hooks.

HSDP with a sparse cross-replica all-reduce (the thin inter-host link; `install_sparse_hsdp`):

    mesh = init_device_mesh("cpu", (R, S), mesh_dim_names=("replicate", "shard"))   # or hsdp_mesh("RxS")
    for layer in model.layers:
        fully_shard(layer, mesh=mesh["shard"])      # 1-D FSDP inside a host: no native all-reduce
    fully_shard(model, mesh=mesh["shard"])
    state = install_sparse_hsdp(model, mesh, density=0.01)
    ... loss.backward(); opt.step(); metrics = state.last_metrics ...
    state.close()

`FSDPModule.set_all_reduce_hook` hands the hook each FSDP parameter group's reduce-scatter output
(this rank's gradient shard, the mean over `mesh["shard"]`) once per backward; the hook runs the
project's `SparseExchange` (exchange/pipeline.py: the same selection, codecs, split all-reduce /
all-gather / dense paths and automatic switch as the DDP hook and ASPG) across
`mesh["replicate"]` on it, and leaves the replicas' mean in place:

    e   = residual[group] + shard          fp32 error-feedback residual beside the shard
    out = SparseExchange(replicate).exchange(group, e, k)      what was sent leaves e
    shard[:] = out                         the same bits on every replica of this shard

Density 1.0 is the exchange's dense path (all-reduce of e, / R), which reproduces native HSDP bit
for bit. Gradient accumulation: `set_requires_gradient_sync(False)` skips the reduction, so the
hook sees the accumulated gradient at the sync step; `set_requires_all_reduce(False)` (reduce-scatter
every micro-step, all-reduce at the last) is honoured by the hook itself - FSDP calls it on every
micro-step under 1-D sharding - by adding the micro-step's shard to the residual and contributing
zero, so the sync step sends the sum, as native HSDP does.

1-D FSDP across thin links (`install_sparse_reduce_scatter`): a custom `ReduceScatter`
(`FSDPModule.set_custom_reduce_scatter`) that sends each owner only the top-k of the entries in
its shard, with sender-side error feedback: the reduce-scatter half of the split all-reduce
(exchange/split.py phase 1, built from the same codec, selector and transport parts). The owner
sums the pieces in rank order and gets exactly the entries sent; what was not sent stays in the
sender's residual. `ReduceScatter` lives in a private torch module: it is imported in one place
(`_reduce_scatter_base`), for the torch versions tested here (`TESTED_TORCH`); others fail with
a clear error.

Checkpoints: `state.state_dict()` goes into the dict you give `torch.distributed.checkpoint.save`
under a key of your choice (per-rank entries: residuals differ between replicas, so they are
keyed by rank and never deduplicated); `state.load_checkpoint(path, key)` reads them back,
refuses a checkpoint written with another mesh, density or codec (with the reason), and loads a
native FSDP2 checkpoint (no residuals) with zero residuals, saying so in the log.

Bad configurations fail at install on every rank with one line: a model not wrapped with
`fully_shard`, native 2-D HSDP (its all-reduce would run too), a mesh that is not
("replicate", "shard") over the whole world or that the model is not sharded over, density
outside (0, 1], an unknown codec or selector, a hook already installed, and ranks that disagree
on the settings (every rank's settings are gathered and compared before anything is installed).

ASPG across the replicas of HSDP (`ShardedASPG`): the gradient hook above compresses the gradient,
which AdamW then normalises per entry; under Adam that loses reward (README, "Sparse gradients under
FSDP2 / HSDP": the 1-bit Adam problem). ShardedASPG instead runs ASPG on each rank's local shards:
FSDP2 over `mesh["shard"]` alone reduce-scatters inside the host, each rank's ASPG takes Adam
steps on its shard of the host's gradient (moments and residual per replica, like ASPG per worker),
and the top-k of the *update* is exchanged across `mesh["replicate"]` (the same SparseExchange).
Every rank in a replicate group holds the same shard coordinate, so the flat layouts agree, and
every replica of a shard applies the same mean: bit-identical. fp32 parameters only (FSDP2's
mixed precision keeps its own copies; not wired here).

    for layer in model.layers: fully_shard(layer, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    opt = ShardedASPG(model, mesh, lr=3e-4, density=0.01)
    loss.backward(); opt.step(); opt.zero_grad()
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from typing import Sequence

import torch
import torch.distributed as dist

from ..codec import VALUE_CODECS, CodecError, roundtrip_values
from ..compress import ErrorFeedback, k_for, load_selector_state, make_selector, selector_state, subtract_sent_
from ..exchange.paths import PATHS
from ..exchange.pipeline import DenseSink, SparseExchange
from ..exchange.split import to_owners
from ..track.comm import CommTracker, ring_allreduce_bytes

log = logging.getLogger("sparsecomm.fsdp")

TESTED_TORCH = ("2.13",)  # torch major.minor whose private ReduceScatter base class was tested here
MESH_DIMS = ("replicate", "shard")
_MARK = "_sparsecomm_fsdp_state"  # set on every FSDPModule a state was installed on
# torch 2.13 renamed reduce_scatter_tensor (the old name warns); same collective
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ------------------------------------------------------------------ torch internals, in one place
def _reduce_scatter_base() -> type:
    """torch's private `ReduceScatter` base class; a clear error on versions not tested here."""
    version = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if version not in TESTED_TORCH:
        raise RuntimeError(f"the sparse FSDP2 reduce-scatter uses torch's private ReduceScatter class, tested on torch "
                           f"{', '.join(TESTED_TORCH)}; this is torch {torch.__version__}: use install_sparse_hsdp "
                           f"(public hook API) or a tested torch")
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
    except ImportError as e:
        raise RuntimeError(f"torch {torch.__version__} has no torch.distributed.fsdp._fully_shard._fsdp_api."
                           f"ReduceScatter ({e}): the sparse reduce-scatter cannot be installed") from None
    return ReduceScatter


def _param_groups(module) -> list:
    """The FSDP parameter groups of one FSDPModule (torch keeps them in its private state)."""
    return list(module._get_fsdp_state()._fsdp_param_groups)


def _fsdp_modules(model) -> list[tuple[str, object]]:
    """(group key, FSDPModule) for every FSDPModule that owns parameters, in module order."""
    from torch.distributed.fsdp import FSDPModule

    return [(name or "root", m) for name, m in model.named_modules() if isinstance(m, FSDPModule) and _param_groups(m)]


# ------------------------------------------------------------------ state
class SparseFSDPState:
    """Residuals, exchange and trackers of one model's sparse FSDP reduction.

    Hyperparameters (the `settings`, compared across ranks at install and checked on load):
    mode (hsdp | reduce_scatter), density, selector, index_codec, value_codec, paths, switch,
    exact, seed, mesh (R, S), groups (FSDP parameter group keys). Internal state: the fp32
    residual per group (`ef`), the exchange's per-group selector / path / split state, the
    iteration count and the tracker.
    """

    def __init__(self, settings: dict, group, rank: int):
        self.settings, self.group, self.rank = settings, group, rank
        self.density = settings["density"]
        self.ef = ErrorFeedback(torch.float32)  # residuals stay fp32 whatever the gradient dtype
        self.comm = CommTracker()
        self.exchange: SparseExchange | None = None  # hsdp mode: across the replicate group
        self.selectors: dict[str, list] = {}  # reduce_scatter mode: per group, one selector per owner shard
        self.iteration = 0  # completed reductions of all groups (backward passes that synchronised)
        self._seen: set[str] = set()
        self._metrics: dict = {}
        self._modules: list = []  # (FSDPModule, its reduce-scatter before ours)
        self._transports: dict = {}  # reduce_scatter mode: id(process group) -> TorchDistTransport

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def last_metrics(self) -> dict:
        """The last reduction's comm/* and timing/* keys (collected on first read after a backward)."""
        if self._seen:
            self._collect()
        return self._metrics

    def _collect(self) -> None:
        numel = sum(t.numel() for t in self.ef.residuals.values())
        world = self.settings["mesh"][0] if self.settings["mode"] == "hsdp" else self.settings["mesh"][1]
        self._metrics = self.comm.collect(numel, 4, world)
        self._seen = set()

    def _mark(self, key: str) -> None:
        if key in self._seen:  # a group seen twice: the previous backward's metrics are complete
            self._collect()
        self._seen.add(key)
        if len(self._seen) == len(self.settings["groups"]):
            self.iteration += 1

    # ------------------------------------------------------------------ hsdp: the all-reduce hook
    def _all_reduce(self, key: str, module, shard: torch.Tensor) -> None:
        """FSDP's all-reduce hook for one parameter group: `shard` becomes the replicas' mean in place."""
        t0 = time.perf_counter()
        if not all(pg.all_reduce_grads for pg in _param_groups(module)):
            self.ef.compensate(key, shard.reshape(-1))  # fp32 residual += this micro-step's shard
            shard.zero_()  # an accumulation micro-step: the residual holds it, the gradient gets nothing yet
        elif shard.dtype == torch.float32 and shard.is_contiguous():
            # residual += shard inside the selection pass, which zeroes the shard; the mean goes into it
            e, pending = self.ef.deferred(key, shard.view(-1))
            if pending is None:
                shard.zero_()
            self.exchange.exchange(key, e, k_for(e.numel(), self.density), DenseSink(shard.view(-1)), move_in=pending)
            self._mark(key)
        else:
            e = self.ef.compensate(key, shard.reshape(-1))  # fp32 residual += this step's shard
            out = torch.zeros(shard.numel(), dtype=torch.float32)
            self.exchange.exchange(key, e, k_for(e.numel(), self.density), DenseSink(out))
            shard.view(-1).copy_(out)
            self._mark(key)
        self.comm.timing_s["fsdp_hook"] = self.comm.timing_s.get("fsdp_hook", 0.0) + time.perf_counter() - t0

    # ------------------------------------------------------------------ 1-D: the sparse reduce-scatter
    def _reduce_scatter(self, key: str, out: torch.Tensor, inp: torch.Tensor, group, op) -> None:
        """Owner j receives the top-k of every rank's chunk j (sender-side error feedback)."""
        from ..exchange.torch_dist import TorchDistTransport

        if op not in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
            raise ValueError(f"sparse reduce-scatter supports SUM and AVG reductions, FSDP asked for {op} "
                             f"(set no gradient_divide_factor)")
        c, S, n = self.comm, dist.get_world_size(group), out.numel()
        e = self.ef.compensate(key, inp.reshape(-1))  # (S n,) fp32: residual + this step's unsharded gradient
        k = k_for(n, self.density)
        with c.phase("reduce_scatter"):
            if k >= n:  # density 1: the default collective on the compensated gradient (native bits)
                with c.phase("transfer"):
                    dense = e if inp.dtype == torch.float32 else e.to(inp.dtype)
                    _reduce_scatter_single(out, dense, op=op, group=group)
                e.zero_()
                vol = ring_allreduce_bytes(n * S, inp.element_size(), S) // 2  # ring reduce-scatter: half an all-reduce
                c.add_sent(vol)
                c.add_received(vol)
                c.note(path="dense", k=n, density=1.0)
            else:
                transport = self._transports.get(id(group))
                if transport is None:  # one per group: its send / receive buffers are reused
                    transport = self._transports[id(group)] = TorchDistTransport(group)
                self._sparse_reduce_scatter(key, e, out, k, op, transport)
        self._mark(key)

    def _sparse_reduce_scatter(self, key, e, out, k, op, transport) -> None:
        c, S, n = self.comm, transport.world_size, out.numel()
        vc, ic = self.settings["value_codec"], self.settings["index_codec"]
        sels = self.selectors.setdefault(key, [self._selector(len(self.selectors) * S + j) for j in range(S)])
        with c.phase("select"):  # (k,) per owner, values as the owner will decode them
            sent = [roundtrip_values(sels[j].select(e[j * n:(j + 1) * n], k), vc) for j in range(S)]
        # the split all-reduce's phase 1 (exchange/split.py), every piece validated before any sum
        parts, error, sent_b, recv_b, _ = to_owners(transport, sent, n, ic, vc, c)
        if transport.max_over_ranks(1.0 if error else 0.0) > 0:  # an owner refused a piece: every rank raises
            raise CodecError(error or "sparse reduce-scatter: an owner refused a piece from a peer (see its log); "
                                      "nothing was applied and no residual changed")
        with c.phase("apply"):
            acc = torch.zeros(n, dtype=torch.float32, device=out.device)
            for part in parts:  # rank order: the same sum on every run
                acc.index_add_(0, part.indices.to(acc.device), part.values.to(acc.device, torch.float32))
            if op == dist.ReduceOp.AVG:
                acc.div_(S)
            out.copy_(acc.view_as(out))
        for j, d in enumerate(sent):  # sender-side error feedback: what was sent leaves the residual
            subtract_sent_(e[j * n:(j + 1) * n], d)
        c.add_sent(sent_b)
        c.add_received(recv_b)
        c.note(path="sparse_reduce_scatter", k=k, density=k / max(n, 1), index_codec=ic,
               applied_entries=sum(p.k for p in parts))

    def _selector(self, index: int):
        name = self.settings["selector"]
        seeded = name in ("sampled", "reuse", "randomk")
        return make_selector(name, **({"seed": self.settings["seed"] + 7919 * self.rank + index} if seeded else {}))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """{"settings": JSON text, "rank{R}": this rank's residuals and exchange state as bytes}: put it into
        the dict given to torch.distributed.checkpoint.save. Opaque leaves on purpose: DCP would flatten
        nested dicts into keys it cannot load back without placeholders, and rank-keyed so that DCP never
        deduplicates them (replicas' residuals differ)."""
        mine = {"ef": self.ef.state_dict(), "iteration": self.iteration,
                "exchange": self.exchange.state_dict() if self.exchange is not None else None,
                "selectors": {key: [selector_state(s) for s in sels] for key, sels in self.selectors.items()}}
        buf = io.BytesIO()
        torch.save(mine, buf)
        return {"settings": json.dumps(self.settings, sort_keys=True), f"rank{self.rank}": buf.getvalue()}

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`'s output; a checkpoint with other settings is refused with the reason."""
        why = _settings_mismatch(json.loads(state["settings"]), self.settings)
        if why:
            raise ValueError(f"sparse FSDP checkpoint does not fit this run: {why}")
        mine = torch.load(io.BytesIO(state[f"rank{self.rank}"]), weights_only=False)
        self.ef.load_state_dict(mine["ef"])
        self.iteration = mine["iteration"]
        if mine["exchange"] is not None:
            self.exchange.load_state_dict(mine["exchange"])
        self.selectors = {}
        for key, states in mine["selectors"].items():
            self.selectors[key] = [self._selector(len(self.selectors) * len(states) + j) for j in range(len(states))]
            for sel, s in zip(self.selectors[key], states):
                load_selector_state(sel, s)

    def load_checkpoint(self, checkpoint_id, key: str = "sparsecomm") -> bool:
        """Load this state from a torch.distributed.checkpoint directory saved with
        `{key: state.state_dict(), ...}`. A native FSDP2 checkpoint (no `key`) leaves zero residuals
        and logs it. Returns whether sparse state was found. Collective: call on every rank."""
        import torch.distributed.checkpoint as dcp

        saved = dcp.FileSystemReader(str(checkpoint_id)).read_metadata().state_dict_metadata
        if f"{key}.settings" not in saved:
            self.ef.residuals = {}
            log.warning("checkpoint %s has no sparse FSDP state (%s.*): a native FSDP2 checkpoint; starting with zero "
                        "residuals", checkpoint_id, key)
            return False
        target = {key: {"settings": ""}}
        dcp.load(target, checkpoint_id=checkpoint_id)  # the same on every rank: a mismatch raises everywhere
        why = _settings_mismatch(json.loads(target[key]["settings"]), self.settings)
        if why:
            raise ValueError(f"sparse FSDP checkpoint {checkpoint_id} does not fit this run: {why}")
        target = {key: {"settings": "", f"rank{self.rank}": b""}}
        dcp.load(target, checkpoint_id=checkpoint_id)
        self.load_state_dict(target[key])
        return True

    def close(self) -> None:
        """Remove the hooks / custom reduce-scatter from the model (FSDP's own reduction comes back)."""
        for m, previous in self._modules:
            for pg in _param_groups(m):
                if self.settings["mode"] == "hsdp":
                    pg._all_reduce_hook = None
                else:
                    pg._reduce_scatter_comm = previous
            if getattr(m, _MARK, None) is self:
                delattr(m, _MARK)
        self._modules = []


def _settings_mismatch(saved: dict, current: dict) -> str:
    """'' when equal, else which settings differ (saved vs current)."""
    keys = sorted(set(saved) | set(current))
    diffs = [f"{k}={saved.get(k)!r} in the checkpoint, {current.get(k)!r} here" for k in keys if saved.get(k) != current.get(k)]
    return "; ".join(diffs)


# ------------------------------------------------------------------ install
def _settings(mode: str, density: float, selector: str, index_codec: str, value_codec: str, paths: Sequence[str],
              switch: str, exact: bool, seed: int, mesh_shape, groups: list[str]) -> dict:
    return {"mode": mode, "density": float(density), "selector": selector, "index_codec": index_codec,
            "value_codec": value_codec, "paths": list(paths), "switch": switch, "exact": bool(exact), "seed": int(seed),
            "mesh": list(mesh_shape), "groups": groups}


def _validate(settings: dict) -> None:
    if not 0 < settings["density"] <= 1:
        raise ValueError(f"density must be in (0, 1], got {settings['density']}")
    if settings["value_codec"] not in VALUE_CODECS:
        raise ValueError(f"unknown value codec {settings['value_codec']!r}; choose from {sorted(VALUE_CODECS)}")
    make_selector(settings["selector"])
    if settings["mode"] == "hsdp":  # the exchange's own checks: paths and switch policy
        SparseExchange(selector=settings["selector"], index_codec=settings["index_codec"],
                       value_codec=settings["value_codec"], paths=settings["paths"], switch=settings["switch"])


def _agree(error: str, settings: dict | None) -> None:
    """Gather every rank's local error and settings; raise the same one-line ValueError on every rank
    when any rank failed or they disagree. Nothing is installed before this returns."""
    world = dist.get_world_size()
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (error, settings))
    failed = [(r, err) for r, (err, _) in enumerate(everyone) if err]
    if failed:
        r, err = failed[0]
        raise ValueError(f"sparse FSDP not installed: rank {r}: {err}" + (f" (and {len(failed) - 1} other rank(s))"
                                                                          if len(failed) > 1 else ""))
    ref = everyone[0][1]
    for r, (_, s) in enumerate(everyone[1:], start=1):
        diffs = [f"{k}: rank 0 has {ref.get(k)!r}, rank {r} has {s.get(k)!r}" for k in sorted(ref)
                 if ref.get(k) != s.get(k)]
        if diffs:
            raise ValueError(f"sparse FSDP not installed: ranks disagree on the settings ({'; '.join(diffs)})")


def _check_model(model, modules: list, *, hook: bool) -> None:
    if not modules:
        raise ValueError(f"{type(model).__name__} is not wrapped with fully_shard (no FSDPModule owns parameters): "
                         f"call fully_shard on its layers and on the model first")
    for key, m in modules:
        if getattr(m, _MARK, None) is not None:
            raise ValueError(f"a sparse FSDP state is already installed on {key!r}: close() it first")
        for pg in _param_groups(m):
            if pg._is_hsdp:
                raise ValueError(f"{key!r} is wrapped with native HSDP (a 2-D mesh), whose own all-reduce would run "
                                 f"too: wrap with fully_shard(module, mesh=mesh['shard'])")
            if hook and pg._all_reduce_hook is not None:
                raise ValueError(f"{key!r} already has an all-reduce hook (set_all_reduce_hook): one hook per module")


def install_sparse_hsdp(model, mesh, density: float = 0.01, *, value_codec: str = "bf16", selector: str = "reuse",
                        index_codec: str = "auto", paths: Sequence[str] = PATHS, switch: str = "volume",
                        exact: bool = False, seed: int = 0) -> SparseFSDPState:
    """Install the sparse cross-replica all-reduce on every FSDPModule of `model` (wrapped with
    fully_shard over mesh["shard"]); returns the state (close(), state_dict(), load_checkpoint(),
    last_metrics). Collective: call on every rank; bad configurations raise on every rank."""
    from ..exchange.torch_dist import TorchDistTransport

    error, settings = "", None
    try:
        if tuple(mesh.mesh_dim_names or ()) != MESH_DIMS or mesh.ndim != 2:
            raise ValueError(f"mesh must be 2-D with dims {MESH_DIMS}, got dims {mesh.mesh_dim_names} "
                             f"(init_device_mesh(device, (R, S), mesh_dim_names={MESH_DIMS}))")
        if mesh.size() != dist.get_world_size():
            raise ValueError(f"mesh {tuple(mesh.shape)} has {mesh.size()} ranks, the world {dist.get_world_size()}")
        modules = _fsdp_modules(model)
        _check_model(model, modules, hook=True)
        shard_ranks = mesh["shard"].mesh.flatten().tolist()
        for key, m in modules:
            for pg in _param_groups(m):
                ranks = pg.mesh_info.mesh.mesh.flatten().tolist()
                if ranks != shard_ranks:
                    raise ValueError(f"{key!r} is sharded over ranks {ranks}, mesh['shard'] here is {shard_ranks}: "
                                     f"wrap with fully_shard(module, mesh=mesh['shard'])")
        settings = _settings("hsdp", density, selector, index_codec, value_codec, paths, switch, exact, seed,
                             tuple(mesh.shape), [k for k, _ in modules])
        _validate(settings)
    except ValueError as e:
        error = str(e)
    _agree(error, settings)

    replicate = mesh["replicate"].get_group()
    state = SparseFSDPState(settings, replicate, dist.get_rank())
    state.exchange = SparseExchange(TorchDistTransport(replicate), selector=selector, index_codec=index_codec,
                                    value_codec=value_codec, paths=paths, switch=switch, exact=exact,
                                    seed=seed + 1009 * dist.get_rank(), comm=state.comm)
    for key, m in modules:
        m.set_all_reduce_hook(lambda shard, key=key, m=m: state._all_reduce(key, m, shard))
        setattr(m, _MARK, state)
        state._modules.append((m, None))
    log.info("sparse HSDP installed: mesh %s, density %g, %s values, %d FSDP groups, settings %s",
             tuple(mesh.shape), density, value_codec, len(modules), state.fingerprint)
    return state


def install_sparse_reduce_scatter(model, density: float = 0.01, *, value_codec: str = "bf16", selector: str = "reuse",
                                  index_codec: str = "auto", seed: int = 0) -> SparseFSDPState:
    """Replace FSDP2's reduce-scatter on every FSDPModule of a 1-D `fully_shard` model with the sparse
    one (top-k per owner shard, sender-side error feedback). Collective: call on every rank."""
    base = _reduce_scatter_base()
    error, settings = "", None
    try:
        modules = _fsdp_modules(model)
        _check_model(model, modules, hook=False)
        sizes = {pg.mesh_info.mesh.size() for _, m in modules for pg in _param_groups(m)}
        if sizes != {dist.get_world_size()}:
            raise ValueError(f"the sparse reduce-scatter needs 1-D fully_shard over the whole world "
                             f"({dist.get_world_size()} ranks); the model's shard groups have {sorted(sizes)}")
        settings = _settings("reduce_scatter", density, selector, index_codec, value_codec, ("sparse",), "volume",
                             False, seed, (1, dist.get_world_size()), [k for k, _ in modules])
        _validate(settings)
    except ValueError as e:
        error = str(e)
    _agree(error, settings)

    state = SparseFSDPState(settings, None, dist.get_rank())
    comm_class = type("SparseReduceScatter", (base,), {
        "__doc__": "FSDP2 ReduceScatter that sends each owner the top-k of its shard (sparsecomm).",
        "__init__": lambda self, key: setattr(self, "key", key),
        "allocate": lambda self, size, *, dtype, device: torch.empty(*size, dtype=dtype, device=device),
        "__call__": lambda self, output_tensor, input_tensor, group, op, async_op=False: state._reduce_scatter(
            self.key, output_tensor, input_tensor, group, op),
    })
    for key, m in modules:
        state._modules.append((m, _param_groups(m)[0]._reduce_scatter_comm))
        m.set_custom_reduce_scatter(comm_class(key))
        setattr(m, _MARK, state)
    log.info("sparse FSDP reduce-scatter installed: %d ranks, density %g, %s values, %d FSDP groups",
             dist.get_world_size(), density, value_codec, len(modules))
    return state


def hsdp_mesh(spec: str, device: str = "cpu"):
    """'RxS' -> a ("replicate", "shard") DeviceMesh of R replica groups x S shards, checked against the
    world size and the hosts (each shard group inside one host: S divides the processes per host).
    Collective: every rank's local world size is gathered, so a mismatch fails on every rank."""
    import os

    from torch.distributed.device_mesh import init_device_mesh

    try:
        r, s = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise ValueError(f"mesh must be RxS (replica groups x shards, e.g. 2x2), got {spec!r}") from None
    world = dist.get_world_size()
    if r < 1 or s < 1 or r * s != world:
        raise ValueError(f"mesh {spec} has {r * s} ranks but the world has {world}: use R x S = {world}")
    local = [0] * world
    dist.all_gather_object(local, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    bad = sorted({n for n in local if n % s})
    if bad:
        raise ValueError(f"mesh {spec}: shard groups of {s} ranks must lie inside one host, but a host runs "
                         f"{bad[0]} process(es): use S dividing the processes per host (--nproc-per-node)")
    return init_device_mesh(device, (r, s), mesh_dim_names=MESH_DIMS)


class ShardedASPG:
    """ASPG over an HSDP model's local shards, exchanging across `mesh["replicate"]` (module docstring).

    Holds one ASPG over aliases of the DTensor parameters' local tensors (`to_local()` shares their
    storage, so ASPG's in-place updates are FSDP2's sharded parameters); `step()` hands it each local
    gradient shard. `last_metrics`, `state_dict` and `load_state_dict` are ASPG's; extra keyword
    arguments go to ASPG (lr, density, value_codec, importance, ...).
    """

    def __init__(self, model, mesh, **aspg_kwargs):
        from ..exchange.torch_dist import TorchDistTransport
        from ..optim.aspg import ASPG

        if tuple(mesh.mesh_dim_names or ()) != ("replicate", "shard") or mesh.size() != dist.get_world_size():
            raise ValueError('ShardedASPG needs the ("replicate", "shard") mesh over the whole world')
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params or not all(hasattr(p, "to_local") for p in self.params):
            raise ValueError("ShardedASPG needs a model wrapped with fully_shard(..., mesh=mesh['shard'])")
        if any(p.dtype != torch.float32 for p in self.params):
            raise ValueError("ShardedASPG supports fp32 parameters only (FSDP2 mixed precision is not wired)")
        if any(p.device_mesh != mesh["shard"] for p in self.params):
            raise ValueError("ShardedASPG: the model must be sharded over mesh['shard'] only (no native HSDP: its "
                             "all-reduce would average gradients across replicas before ASPG sees them)")
        self.local = [p.to_local().detach().requires_grad_(True) for p in self.params]  # aliases of the shards
        self.aspg = ASPG(self.local, transport=TorchDistTransport(mesh["replicate"].get_group()), **aspg_kwargs)
        self.param_groups = self.aspg.param_groups

    @torch.no_grad()
    def step(self) -> None:
        for p, t in zip(self.params, self.local):
            t.grad = None if p.grad is None else p.grad.to_local()
        self.aspg.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        self.aspg.zero_grad(set_to_none=True)

    @property
    def last_metrics(self) -> dict:
        return self.aspg.last_metrics

    def state_dict(self) -> dict:
        return self.aspg.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.aspg.load_state_dict(state)
