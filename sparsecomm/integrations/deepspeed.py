"""sparsecomm inside DeepSpeed ZeRO training: ASPG as the client optimizer, or sparse error-feedback
compression of DeepSpeed's own gradient reduction. No fork of DeepSpeed; tested with 0.19.8.

Install the extra: `pip install 'sparsecomm[deepspeed]'`. DeepSpeed has no communication-hook API
(its issue #886), so this module takes over communication at the two places DeepSpeed 0.19.8's
source offers (read from runtime/engine.py and runtime/zero/stage_1_and_2.py of that release):

  comm="aspg"  (ZeRO stage 0, fp32 or bf16 parameters): ASPG is the client optimizer and
      `engine.enable_backward_allreduce` is turned off - the pattern DeepSpeed's 1-bit
      optimizers used until 0.19.6 - so `engine.backward` leaves every rank's own gradient in
      place and `engine.step()` -> `ASPG.step()` runs the one sparse exchange (of the Adam-style
      update, with error feedback). Replicas stay bit-identical.
  comm="sparse_grad"  (AdamW or any dense optimizer): the gradient reduction itself is compressed
      with the DDP hook's selection, codec and exchange (`SparseExchange` into a `DenseSink`):
        ZeRO-1/2 (`DeepSpeedZeroOptimizer`): its `average_tensor(bucket, dtype)`, which every
          contiguous gradient bucket goes through, is replaced on the optimizer instance;
        ZeRO-0: the engine's `allreduce_bucket(bucket, group)`, which `buffered_allreduce_fallback`
          calls for every flattened bucket, is replaced on the engine instance.
      Each rank keeps an fp32 error-feedback residual per bucket of its own gradient (the unsent
      part of what it computed; `save_checkpoint` stores it per rank beside DeepSpeed's files). Every rank receives
      the same decoded mean, so each ZeRO partition owner steps with the same gradient everywhere
      and replicas stay bit-identical. At density 1.0 the exchange is a dense all-reduce and the
      result equals DeepSpeed's own (tested at 2 ranks, bit for bit).
      With `SparseReduceState(param_density=...)` under ZeRO-1/2, the all-gather of the updated
      partitions after the optimizer step is sparse as well (`SparseParamGather`: top-k of what
      moved since last sent, exact values; the rest stays in the fp32 master and is sent later).
  comm="dense"  DeepSpeed's own path, for baselines.

ZeRO-3 weight sync to rollout workers without a full gather (`Zero3RolloutPublisher`): each rank
diffs its own parameter partition against the bf16 copy it last published and sends only the
changed entries (exact bf16, per checkpoint tensor). `relay_publisher(engine, endpoint)` sends
them to the ZeroMQ coordinator in relay mode (`sparsecomm coordinator --relay`), which checks each
rank's partition, assembles every version from all ranks' patches and streams it to any number of
rollout workers (`RolloutClient`, bit for bit the gathered bf16 model; late joiners get a snapshot);
`ZmqPatchSender` -> `RolloutAssembler` is the direct PUSH to a single subscriber.

Under comm="aspg" DeepSpeed's `gradient_clipping` (1.0 by default in 0.19.8) clips each rank's
local gradient before ASPG sees it; set it to 0 to match sparsecomm's own trainer.

Refused at start, with the reason (on every rank, before any collective):
  - a DeepSpeed version outside SUPPORTED_VERSIONS (the private methods replaced here change
    between releases);
  - ASPG with ZeRO >= 1: ASPG's Adam moments and residual describe each worker's own gradient
    stream for every parameter (DGC / 1-bit Adam structure), while ZeRO-1 hands each rank's
    optimizer one partition and only its own gradient there; partitioning them would need the
    dense gradient reduction ASPG exists to remove (DeepSpeed #5046: 1-bit Adam and ZeRO);
  - ASPG with DeepSpeed's bf16/fp16 wrapper: ASPG keeps its own fp32 master copies of bf16
    parameters, so give DeepSpeed a bf16 model with `bf16.enabled: false`;
  - sparse_grad with ZeRO-3 (its reduce-scatter is a name-mangled private method), CPU offload,
    MoE, `contiguous_gradients: false` or sum instead of mean reduction: paths not taken over here.

    import deepspeed
    from sparsecomm.integrations.deepspeed import initialize, SparseReduceState
    deepspeed.init_distributed("gloo")
    engine = initialize(model, config="launch/recipes/deepspeed_zero2.json",
                        comm="sparse_grad", state=SparseReduceState(density=0.01))
    loss = engine(batch); engine.backward(loss); engine.step()
    engine.sparsecomm_state.last_metrics      # comm/*, timing/* of the last reduction

Run the tests: `pytest tests/integration/test_deepspeed.py`; the benchmark:
`python benchmarks/bench_deepspeed.py` (see its docstring).
"""
from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import torch

from ..codec import VALUE_CODECS
from ..compress import ErrorFeedback, k_for, load_selector_state, make_selector, selector_state
from ..exchange.paths import PATHS, PathChooser
from ..exchange.pipeline import DenseSink, SparseExchange
from ..track.comm import CommTracker

SUPPORTED_VERSIONS = ((0, 19, 8), (0, 20, 0))  # [low, high): the releases whose private methods this replaces
COMMS = ("aspg", "sparse_grad", "dense")


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple((parts + [0, 0, 0])[:3])


def check_version(version: str | None = None) -> str:
    """The installed DeepSpeed version; a clear error if it is outside SUPPORTED_VERSIONS."""
    if version is None:  # from the installed metadata: no 4 s import of deepspeed to check it at start
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as installed

        try:
            version = installed("deepspeed")
        except PackageNotFoundError:
            raise RuntimeError("engine=deepspeed needs DeepSpeed: pip install 'sparsecomm[deepspeed]'") from None
    lo, hi = SUPPORTED_VERSIONS
    if not lo <= _version_tuple(version) < hi:
        raise RuntimeError(f"DeepSpeed {version} is not supported: sparsecomm replaces DeepSpeed methods whose "
                           f"internals are checked for >={'.'.join(map(str, lo))},<{'.'.join(map(str, hi))}; "
                           f"install a version in that range")
    return version


def load_config(config: dict | str | Path) -> dict:
    """A DeepSpeed config as a dict (a path to its JSON file, or the dict itself, copied)."""
    if isinstance(config, (str, Path)):
        return json.loads(Path(config).read_text())
    return json.loads(json.dumps(config))


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def check_combination(config: dict, comm: str, optimizer: Any = None) -> None:
    """Refuse what is not supported, with the reason, before DeepSpeed builds anything."""
    from ..optim.aspg import ASPG

    if comm not in COMMS:
        raise ValueError(f"comm must be one of {COMMS}, got {comm!r}")
    stage = zero_stage(config)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage}")
    zero = config.get("zero_optimization", {})
    low_precision = any(config.get(k, {}).get("enabled", False) for k in ("bf16", "fp16"))
    is_aspg = isinstance(optimizer, ASPG)
    if comm == "aspg" or is_aspg:
        if not is_aspg:
            raise ValueError("comm='aspg' needs an ASPG instance as the optimizer")
        if comm != "aspg":
            raise ValueError(f"an ASPG optimizer communicates itself: use comm='aspg', not {comm!r}")
        if stage != 0:
            raise ValueError(f"ASPG cannot run under ZeRO stage {stage}: its Adam moments and error-feedback residual "
                             "are per worker for every parameter (each describes that worker's own gradient stream), "
                             "but ZeRO >= 1 gives each rank's optimizer one partition and only its own gradient for it; "
                             "use zero_stage 0 with ASPG, or ZeRO-1/2 with AdamW and comm='sparse_grad'")
        if low_precision:
            raise ValueError("ASPG with DeepSpeed's bf16/fp16 optimizer wrapper: the wrapper replaces ASPG's parameters "
                             "with its own flat fp32 copies; ASPG keeps fp32 master weights of bf16 parameters itself, "
                             "so pass a bf16 model with bf16.enabled false")
        if int(config.get("gradient_accumulation_steps", 1)) != 1:
            raise ValueError("comm='aspg' steps ASPG once per engine.step(); set gradient_accumulation_steps to 1")
    if comm == "sparse_grad":
        if stage == 3:
            raise ValueError("comm='sparse_grad' under ZeRO-3: its gradient reduce-scatter is a name-mangled private "
                             "method of DeepSpeedZeroOptimizer_Stage3 and is not taken over; use stage 0, 1 or 2")
        if zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None):
            raise ValueError("comm='sparse_grad' with optimizer offload is not supported (its gradient path differs)")
        if stage in (1, 2) and not zero.get("contiguous_gradients", True):
            raise ValueError("comm='sparse_grad' under ZeRO-1/2 needs contiguous_gradients true: only contiguous "
                             "buckets go through average_tensor, the method replaced")
        if config.get("gradient_allreduce_op", "mean") not in ("mean", None) or config.get("prescale_gradients"):
            raise ValueError("comm='sparse_grad' reduces to the mean over ranks: leave gradient_allreduce_op at "
                             "'mean' and prescale_gradients off")
        if float(config.get("gradient_predivide_factor", 1.0)) != 1.0:
            raise ValueError("comm='sparse_grad' does not use gradient_predivide_factor; leave it at 1.0")


_HYPER = ("density", "selector", "index_codec", "value_codec", "paths", "switch", "warmup_steps", "seed",
          "param_density")
_ADDED_HYPER_DEFAULTS = {"param_density": None}  # checkpoints written before the field existed


class SparseReduceState:
    """Sparse error-feedback compression of DeepSpeed's gradient buckets (the DDP hook's exchange).

    Hyperparameters (validated here): `density` (fraction of each bucket's entries sent per
    step), `selector`, `index_codec`, `value_codec`, `paths` (leave out "dense" to never fall
    back), `switch`, `warmup_steps` (dense steps first), `seed`; `param_density` (ZeRO-1/2 only,
    default None = DeepSpeed's dense all-gather): the all-gather of the updated partitions is
    sparse too (`SparseParamGather`: each owner sends that fraction of its partition per step, the
    entries that moved most since they were last sent; the rest follows in later steps).
    State: the residual of each bucket (keyed by its parameters and size), the exchange's
    selector generators, thresholds and split owner residuals, the step count, and with
    param_density the published copy of this rank's partitions; `save_checkpoint` writes it per
    rank beside DeepSpeed's checkpoint.
    """

    def __init__(self, density: float = 0.01, selector: str = "reuse", index_codec: str = "auto",
                 value_codec: str = "bf16", paths: tuple[str, ...] = PATHS, switch: str = "volume",
                 warmup_steps: int = 0, seed: int = 0, param_density: float | None = None):
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density}")
        if param_density is not None and not 0 < param_density <= 1:
            raise ValueError(f"param_density must be None (dense all-gather) or in (0, 1], got {param_density}")
        if value_codec not in VALUE_CODECS:
            raise ValueError(f"unknown value codec {value_codec!r}; choose from {sorted(VALUE_CODECS)}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        make_selector(selector)  # validates the name
        PathChooser(switch, candidates=paths)  # validates the policy and the paths
        self.density, self.selector, self.index_codec, self.value_codec = density, selector, index_codec, value_codec
        self.paths, self.switch, self.warmup_steps, self.seed = tuple(paths), switch, warmup_steps, seed
        self.param_density = param_density
        self.param_gather: SparseParamGather | None = None  # ZeRO-1/2 with param_density, at install
        self.exchange: SparseExchange | None = None  # bound to the engine's data-parallel group at install
        self.ef = ErrorFeedback()
        self.comm = CommTracker()
        self.steps = 0  # replicated: reductions completed (optimizer steps)
        self.last_metrics: dict = {}
        self._pending: dict | None = None  # exchange state from a checkpoint, loaded once the exchange exists
        self._calls = 0  # buckets reduced in the current reduction (keys the engine's anonymous buckets)

    def bind(self, group) -> None:
        from ..exchange.torch_dist import TorchDistTransport

        self.exchange = SparseExchange(TorchDistTransport(group), selector=self.selector, index_codec=self.index_codec,
                                       value_codec=self.value_codec, paths=self.paths, switch=self.switch,
                                       seed=self.seed, comm=self.comm)
        if self._pending is not None:
            self.exchange.load_state_dict(self._pending)
            self._pending = None

    def reduce_(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """tensor (this rank's flat gradient bucket) becomes the mean over ranks of the sparse deltas,
        in place; the unsent part stays in this rank's residual for `key`."""
        density = 1.0 if self.steps < self.warmup_steps else self.density
        if tensor.dtype == torch.float32 and tensor.is_contiguous():
            # residual += gradient inside the selection pass, which zeroes the bucket; the mean goes into it
            e, pending = self.ef.deferred(key, tensor.view(-1))
            if pending is None:
                tensor.zero_()
            self.exchange.exchange(key, e, k_for(e.numel(), density), DenseSink(tensor.view(-1)), move_in=pending)
        else:
            e = self.ef.compensate(key, tensor)  # (n,) fp32 residual + this step's gradient: the live buffer
            mean = torch.zeros_like(e)
            self.exchange.exchange(key, e, k_for(e.numel(), density), DenseSink(mean))
            tensor.copy_(mean)
        self._calls += 1
        return tensor

    def end_reduction(self) -> None:
        """After the last bucket of a step: metrics, step count."""
        numel = sum(t.numel() for t in self.ef.residuals.values())
        self.last_metrics = self.comm.collect(numel, 4, self.exchange.world_size)
        self.steps += 1
        self._calls = 0

    def state_dict(self) -> dict:
        return {"hyper": {name: getattr(self, name) for name in _HYPER}, "ef": self.ef.state_dict(),
                "steps": self.steps,
                "exchange": self.exchange.state_dict() if self.exchange is not None else self._pending,
                "param_gather": self.param_gather.state_dict() if self.param_gather is not None else None}

    def load_state_dict(self, state: dict) -> None:
        hyper = {**_ADDED_HYPER_DEFAULTS, **state["hyper"]}
        if hyper != {name: getattr(self, name) for name in _HYPER}:
            raise ValueError(f"checkpoint was made with sparse reduction {hyper}, this run has "
                             f"{ {name: getattr(self, name) for name in _HYPER} }")
        self.ef.load_state_dict(state["ef"])
        self.steps = state["steps"]
        if self.param_gather is not None:
            self.param_gather.load_state_dict(state["param_gather"])
        if self.exchange is not None:
            self.exchange.load_state_dict(state["exchange"])
        else:
            self._pending = state["exchange"]


# ---------------------------------------------------------------------------- installation
def _install_zero12(opt, state: SparseReduceState) -> None:
    """Replace DeepSpeedZeroOptimizer.average_tensor on this instance (ZeRO-1/2, contiguous buckets).

    DeepSpeed's own method, with reduce_scatter off, all-reduces the bucket and then adds this
    rank's partition slices to its compact gradient buffer (`_add_full_reduction_to_compact_grad_
    partition`); `reduce_ipg_grads` afterwards copies the partition's gradients out of the bucket.
    The replacement does the same with the all-reduce replaced by the sparse exchange.
    """
    def average_tensor(self, tensor: torch.Tensor, communication_data_type: torch.dtype):
        if tensor.numel() == 0:
            return
        params = self.ipg_buckets[communication_data_type].params
        key = f"z{params[0][2]}-{params[-1][2]}:{tensor.numel()}" if params else f"z:{tensor.numel()}"
        state.reduce_(key, tensor)
        self._add_full_reduction_to_compact_grad_partition(tensor, communication_data_type)

    opt.average_tensor = types.MethodType(average_tensor, opt)


class SparseParamGather:
    """ZeRO-1/2's all-gather of the updated partitions, sparse, with nothing lost (param_density).

    DeepSpeed's `step()` updates each rank's fp32 partition (the master), copies it into the rank's
    slice of the flat model weights and all-gathers the slices: dense, 4 B per parameter, the
    3x-only traffic that stays once the gradient reduction is compressed (results/deepspeed.md).
    Here every rank keeps the *published* copy of its own slice (what every rank holds for it) and
    sends only the k = param_density x slice entries where the master moved most away from it
    (`reuse` top-k of |master rounded to the weights' dtype - published|: in bf16 an entry that already
    holds its master's rounding is never picked again), as new values in the weights' own dtype (exact:
    what a receiver writes is what the owner writes). The rest is not lost: master - published is the
    error-feedback residual, carried by the optimizer's fp32 master, sent in a later step once it
    grows. Every rank writes the same values into the same slices, so replicas stay bit-identical,
    and the forward pass runs on the published weights (the master leads them by that residual).
    At param_density 1 the result is DeepSpeed's dense all-gather, bit for bit.

    Only `step()`'s gather is replaced (a flag set around it): `update_lp_params` and checkpoint
    loading keep DeepSpeed's dense all-gather, after which every rank holds the masters and the
    published copies are reset to them; a resumed run restores them from its rank file instead
    (`load_state_dict` + `publish_held`), so it continues bit for bit.
    """

    def __init__(self, opt, density: float, index_codec: str, seed: int, comm: CommTracker):
        import torch.distributed as dist

        from ..exchange.torch_dist import TorchDistTransport

        self.opt, self.density, self.index_codec, self.comm = opt, density, index_codec, comm
        self.transports = [TorchDistTransport(g) for g in opt.real_dp_process_group]
        self.ranks = [dist.get_rank(group=g) for g in opt.real_dp_process_group]
        self.held = [parts[r].detach().clone() for parts, r in zip(opt.parallel_partitioned_bit16_groups, self.ranks)]
        self.selectors = [make_selector("reuse", seed=seed + 104729 * (i + 1)) for i in range(len(self.held))]
        self.in_step = False

    def gather(self) -> None:
        """Replaces all_gather_dp_groups inside step(): the sparse all-gather of every group's slices."""
        from ..codec import encode
        from ..delta import SparseDelta
        from ..exchange.aggregate import decode_all

        c = self.comm
        for i, parts in enumerate(self.opt.parallel_partitioned_bit16_groups):
            tr, r, held = self.transports[i], self.ranks[i], self.held[i]
            own, n = parts[r], held.numel()
            if any(p.numel() != n for p in parts):
                raise RuntimeError(f"group {i}: ZeRO partitions of unequal sizes {[p.numel() for p in parts]}")
            codec = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[own.dtype]
            new = own.detach().view(-1)  # DeepSpeed just copied the master here: the value a dense gather publishes
            with c.phase("param_select"):
                # ranked in the weights' dtype, not against the fp32 master: a bf16 entry already at its master's
                # rounding has nothing to send, however large that rounding error (it would starve small entries)
                moved = new.float() - held.view(-1).float()  # (n,) fp32: what the other ranks do not have yet
                sel = self.selectors[i].select(moved, k_for(n, self.density))
                d = SparseDelta(sel.indices, new[sel.indices], (n,), own.dtype)  # a copy: own is rewritten below
            with c.phase("param_encode"):
                payload = encode(d, self.index_codec, codec)
            with c.phase("param_transfer"):
                payloads = tr.all_gather_bytes(payload)
            with c.phase("param_decode"):
                deltas = decode_all(payloads, n)  # all validated before any slice is written
            with c.phase("param_apply"):
                own.copy_(held)  # undo DeepSpeed's dense copy of the master: this slice is what every rank holds
                for q, dq in enumerate(deltas):
                    parts[q].view(-1)[dq.indices] = dq.values.to(own.dtype)
                held.copy_(own)
            sent, recv = tr.wire_bytes([len(b) for b in payloads])
            c.add_sent(sent)
            c.add_received(recv)
            c.note(param_entries=sum(dq.k for dq in deltas), param_density=self.density)

    def reset(self) -> None:
        """After a dense all-gather (every rank holds the masters): they are the published copies now."""
        for held, parts, r in zip(self.held, self.opt.parallel_partitioned_bit16_groups, self.ranks):
            held.copy_(parts[r])

    def publish_held(self) -> None:
        """Every rank's slices back to the published copies (after a checkpoint load wrote the masters)."""
        opt = self.opt
        for held, parts, r in zip(self.held, opt.parallel_partitioned_bit16_groups, self.ranks):
            parts[r].copy_(held)
        _DENSE_GATHER(groups_flat=opt.bit16_groups_flat, partitioned_param_groups=opt.parallel_partitioned_bit16_groups,
                      dp_process_group=opt.real_dp_process_group,
                      start_alignment_factor=opt.nccl_start_alignment_factor,
                      allgather_bucket_size=opt.allgather_bucket_size)
        for i in range(len(self.held)):
            opt._update_model_bit16_weights(i)

    def state_dict(self) -> dict:
        return {"held": [h.clone() for h in self.held], "selectors": [selector_state(s) for s in self.selectors]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["held"]) != len(self.held) or any(a.shape != b.shape for a, b in zip(state["held"], self.held)):
            raise ValueError("checkpoint's published partitions do not match this engine's ZeRO partitions")
        for h, saved in zip(self.held, state["held"]):
            h.copy_(saved)
        for sel, s in zip(self.selectors, state["selectors"]):
            load_selector_state(sel, s)


_SPARSE_GATHERS: dict[int, SparseParamGather] = {}  # id(optimizer.parallel_partitioned_bit16_groups) -> gather
_DENSE_GATHER = None  # DeepSpeed's all_gather_dp_groups, once the dispatcher replaced it


def _install_param_gather(opt, state: SparseReduceState) -> SparseParamGather:
    """Route step()'s all-gather of this optimizer through a SparseParamGather.

    DeepSpeed 0.19.8 calls the module-level `all_gather_dp_groups` of zero/stage_1_and_2.py from
    `step()` and `update_lp_params()`; it is replaced once by a dispatcher that sends the calls of
    registered optimizers (by their partition list) inside step() to their gather, and every
    other call to DeepSpeed's own function."""
    global _DENSE_GATHER
    import deepspeed.runtime.zero.stage_1_and_2 as z12

    if _DENSE_GATHER is None:
        _DENSE_GATHER = z12.all_gather_dp_groups

        def all_gather_dp_groups(*args, **kw):
            groups = kw["partitioned_param_groups"] if "partitioned_param_groups" in kw else args[1]
            g = _SPARSE_GATHERS.get(id(groups))
            if g is not None and g.in_step:
                return g.gather()
            out = _DENSE_GATHER(*args, **kw)
            if g is not None:
                g.reset()
            return out

        z12.all_gather_dp_groups = all_gather_dp_groups
    gather = SparseParamGather(opt, state.param_density, state.index_codec, state.seed, state.comm)
    _SPARSE_GATHERS[id(opt.parallel_partitioned_bit16_groups)] = gather
    inner_step = opt.step

    def step(*args, **kwargs):
        gather.in_step = True
        try:
            out = inner_step(*args, **kwargs)
        finally:
            gather.in_step = False
        state.end_reduction()  # after the gather, so a step's metrics hold both of its exchanges
        return out

    opt.step = step
    state.param_gather = gather
    return gather


def _install_engine(engine, state: SparseReduceState) -> None:
    """Replace engine.allreduce_bucket on this instance (ZeRO-0, and bf16 ZeRO-1's BF16_Optimizer)."""
    def allreduce_bucket(self, bucket, dp_group, dp_world_size=None):
        tensor = self.flatten(bucket)  # (n,) this rank's gradients of the bucket, flattened
        return state.reduce_(f"e{state._calls}:{tensor.numel()}:{tensor.dtype}", tensor)

    engine.allreduce_bucket = types.MethodType(allreduce_bucket, engine)


def _wrap_reduction_end(engine, state: SparseReduceState) -> None:
    """End the state's step after DeepSpeed's reduction of a step (the accumulation boundary)."""
    inner = engine.allreduce_gradients

    def allreduce_gradients(*args, **kwargs):
        out = inner(*args, **kwargs)
        if engine.is_gradient_accumulation_boundary() and state.param_gather is None:  # else: after the step
            state.end_reduction()
        return out

    engine.allreduce_gradients = allreduce_gradients


def _rank_state_path(engine, directory: str | Path, tag: str) -> Path:
    import torch.distributed as dist

    return Path(directory) / str(tag) / f"sparsecomm_rank{dist.get_rank()}.pt"


def save_checkpoint(engine, save_dir: str | Path, tag: str | None = None, **kwargs) -> str:
    """engine.save_checkpoint, plus this rank's sparsecomm state in its own file.

    DeepSpeed writes a non-ZeRO optimizer's state from data-parallel rank 0 only; ASPG's moments
    and residual and the reduction's residuals differ per rank, so every rank saves its own
    (`TAG/sparsecomm_rank{R}.pt`). Returns the tag."""
    tag = tag if tag is not None else f"global_step{engine.global_steps}"
    engine.save_checkpoint(str(save_dir), tag=tag, **kwargs)
    torch.save(engine.sparsecomm_state.state_dict(), _rank_state_path(engine, save_dir, tag))
    torch.distributed.barrier()  # every rank's file exists before anyone resumes from it
    return tag


def load_checkpoint(engine, load_dir: str | Path, tag: str | None = None, **kwargs):
    """engine.load_checkpoint, then this rank's own sparsecomm state (ASPG, or the residuals)."""
    if tag is None:
        tag = (Path(load_dir) / "latest").read_text().strip()
    out = engine.load_checkpoint(str(load_dir), tag=tag, **kwargs)
    path = _rank_state_path(engine, load_dir, tag)
    if not path.exists():
        raise FileNotFoundError(f"{path}: this checkpoint has no sparsecomm state for this rank (saved with "
                                "engine.save_checkpoint instead of sparsecomm.integrations.deepspeed.save_checkpoint?)")
    state = engine.sparsecomm_state
    state.load_state_dict(torch.load(path, weights_only=False))
    if getattr(state, "param_gather", None) is not None:  # DeepSpeed's load gathered the masters densely
        state.param_gather.publish_held()
    return out


def install_sparse_reduction(engine, state: SparseReduceState) -> SparseReduceState:
    """Compress an initialized engine's gradient reduction with `state` (ZeRO-0/1/2)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if engine.has_moe_layers:
        raise ValueError("comm='sparse_grad' with MoE layers is not supported (expert gradients reduce separately)")
    if not engine.enable_backward_allreduce:
        raise ValueError("the engine's backward all-reduce is off: nothing to compress")
    state.bind(engine.seq_data_parallel_group if getattr(engine, "seq_data_parallel_group", None) is not None
               else engine.data_parallel_group)
    if isinstance(engine.optimizer, DeepSpeedZeroOptimizer):
        _install_zero12(engine.optimizer, state)
        if state.param_density is not None:
            _install_param_gather(engine.optimizer, state)
    else:
        if state.param_density is not None:
            raise ValueError(f"param_density replaces the all-gather of DeepSpeedZeroOptimizer (ZeRO-1/2); this "
                             f"engine's optimizer is {type(engine.optimizer).__name__} (ZeRO-0 has no such gather; "
                             "bf16 ZeRO-1's BF16_Optimizer gathers in its own code, not taken over)")
        _install_engine(engine, state)
    _wrap_reduction_end(engine, state)
    engine.sparsecomm_state = state
    return state


def initialize(model: torch.nn.Module, config: dict | str | Path, optimizer=None, comm: str = "aspg",
               state: SparseReduceState | None = None, **kwargs):
    """deepspeed.initialize with sparsecomm's communication; returns the engine.

    comm="aspg": `optimizer` is an ASPG built with a TorchDistTransport on the data-parallel group;
    DeepSpeed's backward all-reduce is turned off and ASPG exchanges in step().
    comm="sparse_grad": `optimizer` is any dense optimizer (or None: DeepSpeed builds the one in the
    config); `state` (default SparseReduceState()) compresses the gradient reduction.
    comm="dense": DeepSpeed as it is.
    """
    check_version()
    cfg = load_config(config)
    check_combination(cfg, comm, optimizer)
    import deepspeed

    if comm == "aspg":
        P = torch.distributed.get_world_size()
        if optimizer.transport.world_size != P:
            raise ValueError(f"ASPG's transport spans {optimizer.transport.world_size} ranks, the job has {P}: build "
                             "it with TorchDistTransport() after deepspeed.init_distributed()")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg, **kwargs)
    if comm == "aspg":
        if engine.optimizer is not optimizer:
            raise RuntimeError(f"DeepSpeed wrapped ASPG in {type(engine.optimizer).__name__}: unsupported config")
        engine.enable_backward_allreduce = False  # each rank keeps its own gradient; ASPG.step() communicates
        engine.sparsecomm_state = optimizer
    elif comm == "sparse_grad":
        install_sparse_reduction(engine, state or SparseReduceState())
    return engine


# ---------------------------------------------------------------------------- ZeRO-3 rollout sync
class Zero3RolloutPublisher:
    """Weight sync from ZeRO-3 to rollout workers without gathering the model.

    Each rank diffs its own partition of every parameter (`param.ds_tensor`, the slice
    [rank * part, rank * part + part) of the flat parameter) against the bf16 copy of it that it
    last published, and sends only the entries whose bf16 bits changed: one framed message per
    version (`codec.encode_model`: per checkpoint tensor name, its full shape, flat int32-coded
    indices and exact bf16 values - the patch shape vLLM's sparse weight transfer applies in place).
    The first version sends the whole partition (the anchor). A subscriber (`RolloutAssembler`)
    writes every rank's patches into its bf16 tensors; ranks' entries are disjoint, so their order
    within a version does not matter.

    Memory per rank: the bf16 copy of its own partition (half its fp32 size) plus one tensor's
    partition being compared (the "bucket"); the full model is never gathered. `held_bytes` and
    `peak_temp_bytes` report both, from the tensors themselves.

    `send(payload: bytes, version: int, rank: int)` delivers the message (e.g. `ZmqPatchSender`).
    """

    def __init__(self, engine, send):
        if not engine.zero_optimization_partition_weights():
            raise ValueError("Zero3RolloutPublisher needs a ZeRO-3 engine (zero_optimization.stage 3)")
        import torch.distributed as dist

        self.send = send
        self.group = engine.data_parallel_group  # relay senders: the ranks agree on failures over it
        self.rank = dist.get_rank(engine.data_parallel_group)
        self.params = [(name, p) for name, p in engine.module.named_parameters()]
        self.last: dict[str, torch.Tensor] = {}  # name -> (n,) bf16 of this rank's partition, as last published
        self.version = 0
        self.peak_temp_bytes = 0

    @property
    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.last.values())

    def _partition(self, p) -> tuple[int, torch.Tensor]:
        """(flat offset of this rank's slice, its valid entries as bf16); the padding past ds_numel is cut."""
        part = p.ds_tensor.ds_numel
        start = self.rank * part
        n = max(0, min(part, p.ds_numel - start))
        return start, p.ds_tensor.detach().view(-1)[:n].to(torch.bfloat16)

    def patch(self) -> tuple[bytes, int]:
        """This rank's patch for the next version: (encoded message, changed entries)."""
        from ..codec.message import encode_model
        from ..delta import SparseDelta

        deltas, changed_k = {}, 0
        for name, p in self.params:
            start, cur = self._partition(p)  # (n,) bf16: the only per-tensor temporary
            last = self.last.get(name)
            if last is None:  # first version: the whole partition
                idx = torch.arange(cur.numel(), dtype=torch.int64)
            else:
                idx = (cur.view(torch.int16) != last.view(torch.int16)).nonzero().view(-1)
            self.peak_temp_bytes = max(self.peak_temp_bytes, 2 * cur.numel() + 8 * idx.numel())
            deltas[name] = SparseDelta(idx + start, cur[idx], tuple(p.ds_shape), torch.bfloat16)
            changed_k += idx.numel()
            self.last[name] = cur
        self.version += 1
        return encode_model(deltas, "auto", "bf16", step=self.version), changed_k

    def start_at(self, version: int) -> None:
        """Continue after `version` with a full partition (an anchor): a relay's next version is
        version + 1, and what it holds of this rank is no longer assumed."""
        self.version = version
        self.last.clear()

    def publish(self) -> dict:
        """Send this version's patch; returns {"version", "sent_bytes", "changed_entries"}.

        With a relay sender (`PublisherClient`, via `relay_publisher`) every rank learns whether any
        rank's send failed (one 1-element all-reduce over the data-parallel group per version): if one
        did (the relay restarted, a reply timed out), all ranks rejoin, agree on the relay's next version
        and send their whole partitions for it together, so a version never combines different training
        steps of different ranks. A patch the relay refuses (a bug: bad partition, layout) raises on
        every rank. A plain sender (`ZmqPatchSender`) raises its own errors."""
        payload, k = self.patch()
        rejoin = getattr(self.send, "rejoin", None)
        if rejoin is None:
            self.send(payload, self.version, self.rank)
            return {"version": self.version, "sent_bytes": len(payload), "changed_entries": k}
        from ..exchange.zmq_client import CoordinatorError

        status, error = 0, None  # 0 sent, 1 re-anchor (the relay lost us or a reply), 2 refused
        try:
            self.send(payload, self.version, self.rank)
        except (TimeoutError, CoordinatorError) as e:
            error = e
            status = 1 if isinstance(e, TimeoutError) or e.reason in ("unknown_worker", "stale") else 2
        worst = self._all_ranks(status, "max")
        if worst == 2:
            raise RuntimeError(f"rank {self.rank}: a ZeRO-3 patch for relay version {self.version} was refused "
                               f"({error or 'on another rank'})")
        if worst == 1:
            nxt = rejoin()  # every rank rejoins (clearing its pending patches) before any anchor goes out,
            if self._all_ranks(nxt, "max") != self._all_ranks(nxt, "min"):  # so all are told the same version
                raise RuntimeError(f"rank {self.rank}: ranks rejoined the relay at different versions")
            self.start_at(nxt - 1)
            payload, k = self.patch()
            self.send(payload, self.version, self.rank)
        return {"version": self.version, "sent_bytes": len(payload), "changed_entries": k}

    def _all_ranks(self, value: int, op: str) -> int:
        """max or min of `value` over the data-parallel group (this rank's value without one)."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size(self.group) == 1:
            return value
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" else "cpu"
        t = torch.tensor([value if op == "max" else -value], dtype=torch.int64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item()) if op == "max" else -int(t.item())


def relay_publisher(engine, endpoint: str, worker_id: str | None = None, **client_kw) -> Zero3RolloutPublisher:
    """This ZeRO-3 rank's publisher to a relay coordinator (`sparsecomm coordinator --relay`): joins as
    rank r of the data-parallel group (worker id `zero3-rank{r}` unless given) with the layout
    fingerprint rollout workers compute from their model (`relay.layout_fingerprint`), and starts
    at the relay's next version with a full partition. `publish()` after each optimizer step."""
    import torch.distributed as dist

    from ..exchange.coordinator.relay import layout_fingerprint
    from ..exchange.zmq_client import PublisherClient

    rank, ranks = dist.get_rank(engine.data_parallel_group), dist.get_world_size(engine.data_parallel_group)
    client = PublisherClient(endpoint, worker_id or f"zero3-rank{rank}", **client_kw)
    pub = Zero3RolloutPublisher(engine, client)
    fingerprint = layout_fingerprint((name, p.ds_shape) for name, p in pub.params)
    pub.start_at(client.join(fingerprint, sum(p.ds_numel for _, p in pub.params), rank, ranks) - 1)
    return pub


class ZmqPatchSender:
    """PUSH each patch to a rollout subscriber's PULL socket: [msgpack header, patch]."""

    def __init__(self, endpoint: str, context=None):
        import zmq

        self.socket = (context or zmq.Context.instance()).socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, 10_000)  # close() still delivers what is queued
        self.socket.connect(endpoint)

    def __call__(self, payload: bytes, version: int, rank: int) -> None:
        import msgpack

        self.socket.send_multipart([msgpack.packb({"op": "zero3_patch", "version": version, "rank": rank}), payload])

    def close(self) -> None:
        self.socket.close()


class RolloutAssembler:
    """A rollout worker's bf16 model, reassembled from every rank's ZeRO-3 patches."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}  # name -> bf16 tensor of the checkpoint's shape
        self.versions: dict[int, int] = {}  # rank -> last version applied

    def apply(self, payload: bytes, version: int, rank: int) -> None:
        from ..codec.message import decode_model

        if version != self.versions.get(rank, 0) + 1:
            raise ValueError(f"rank {rank}: patch for version {version} after version {self.versions.get(rank, 0)}")
        for name, d in decode_model(payload).items():  # validated (CRCs, ranges) before anything is written
            t = self.tensors.setdefault(name, torch.zeros(d.shape, dtype=torch.bfloat16))
            t.view(-1)[d.indices] = d.values.to(torch.bfloat16)
        self.versions[rank] = version
