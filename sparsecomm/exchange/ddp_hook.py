"""Sparse top-k DDP communication hook with error feedback, for plain DDP, Accelerate and TRL.

    from sparsecomm.exchange import SparseHookState, sparse_topk_hook
    state = SparseHookState(density=0.01)
    ddp_model.register_comm_hook(state, sparse_topk_hook)

Per gradient bucket: e = residual + grad; d = top-k(e); residual = e - roundtrip(d); all-gather
the encoded d from every rank; the bucket becomes the mean of the workers' deltas. Density 1.0
(or a dense warm-up iteration, or the automatic switch when sparse would move more bytes) takes
a plain all-reduce of e, which equals DDP's default hook.

Error feedback here wraps the *gradient*, the only thing a DDP hook sees. Under Adam that is
the compression 1-bit Adam warned about (the second moment then sees compressed gradients);
prefer the ASPG optimizer, which compresses the Adam update itself, when you control the
optimizer. This hook is for when you do not (TRL/Accelerate training loops).

Collective order: every collective is issued inside the hook, synchronously, in bucket order,
and the hook returns an already-completed future. PyTorch's powerSGD_hook issues follow-up
collectives from `.then()` callbacks, which lets ranks interleave them differently with several
buckets on gloo (size mismatches or hangs); this hook cannot, and is tested with several buckets.
"""
# No `from __future__ import annotations` here: DDP checks the hook's annotations at runtime
# (`bucket: dist.GradBucket`, return `torch.futures.Future[torch.Tensor]`) and rejects string annotations.
import time

import torch
import torch.distributed as dist

from ..codec import VALUE_CODECS, encode, roundtrip_values
from ..compress import ErrorFeedback, k_for, make_selector
from ..track.comm import CommTracker, ring_allreduce_bytes
from .base import PathChooser, apply_mean_


class SparseHookState:
    __slots__ = (
        # hyperparameters the user tunes
        "density", "selector_name", "index_codec", "value_codec", "dense_fallback", "fallback_margin",
        "warmup_iterations", "switch", "seed",
        # internal state
        "process_group", "transport", "selector", "ef", "iteration", "comm", "last_metrics", "resets", "choosers",
    )

    def __init__(self, process_group=None, density: float = 0.01, selector: str = "sampled", index_codec: str = "auto",
                 value_codec: str = "bf16", dense_fallback: bool = True, fallback_margin: float = 1.0,
                 warmup_iterations: int = 0, switch: str = "volume", seed: int = 0):
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density}")
        if value_codec not in VALUE_CODECS:
            raise ValueError(f"unknown value codec {value_codec!r}; choose from {sorted(VALUE_CODECS)}")
        if warmup_iterations < 0 or fallback_margin <= 0:
            raise ValueError("warmup_iterations must be >= 0 and fallback_margin > 0")
        make_selector(selector)  # validates the name
        PathChooser(switch)  # validates the policy
        self.density, self.selector_name, self.index_codec, self.value_codec = density, selector, index_codec, value_codec
        self.dense_fallback, self.fallback_margin, self.warmup_iterations, self.switch, self.seed = (
            dense_fallback, fallback_margin, warmup_iterations, switch, seed)
        self.process_group = process_group
        self._init_internal()

    def _init_internal(self) -> None:
        self.transport = None  # created on first use, after init_process_group
        self.selector = make_selector(self.selector_name, **({"seed": self.seed} if self.selector_name == "sampled" else {}))
        self.ef = ErrorFeedback()
        self.iteration = 0
        self.comm = CommTracker()
        self.last_metrics: dict = {}
        self.resets = 0  # residuals dropped because DDP rebuilt its buckets
        self.choosers: dict[str, PathChooser] = {}  # one per bucket: sizes (and timings) differ

    def __getstate__(self):
        """Checkpointable: hyperparameters, residuals and iteration; never the process group."""
        state = {name: getattr(self, name) for name in self.__slots__
                 if name not in ("process_group", "transport", "selector", "comm", "last_metrics", "choosers")}
        state["ef"] = self.ef.state_dict()
        return state

    def __setstate__(self, state):
        self.process_group = None
        for name in ("density", "selector_name", "index_codec", "value_codec", "dense_fallback", "fallback_margin",
                     "warmup_iterations", "switch", "seed"):
            setattr(self, name, state[name])
        self._init_internal()
        self.ef.load_state_dict(state["ef"])
        self.iteration, self.resets = state["iteration"], state["resets"]


def _transport(state: SparseHookState):
    if state.transport is None:
        from .torch_dist import TorchDistTransport

        state.transport = TorchDistTransport(state.process_group)
    return state.transport


def sparse_topk_hook(state: SparseHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    tr = _transport(state)
    grad = bucket.buffer()  # (n,) flattened gradients of this bucket, summed by nobody yet
    key, c = f"bucket{bucket.index()}", state.comm
    if key in state.ef.residuals and state.ef.residuals[key].shape != grad.shape:
        del state.ef.residuals[key]  # DDP rebuilt its buckets after the first iteration
        state.resets += 1
    e = state.ef.compensate(key, grad)
    density = 1.0 if state.iteration < state.warmup_iterations else state.density
    P, n = tr.world_size, grad.numel()
    chooser = state.choosers.get(key)
    if chooser is None:
        chooser = state.choosers[key] = PathChooser(state.switch, state.dense_fallback, state.fallback_margin)
    path = chooser.choose(n, density, P, VALUE_CODECS[state.value_codec].bytes_per_value)
    t0 = time.perf_counter()
    if path == "dense":
        with c.phase("transfer"):
            result = e.clone()
            tr.all_reduce_mean_(result)
            e.zero_()
        c.add_sent(ring_allreduce_bytes(n, 4, P))
        c.note(path="dense")
    else:
        with c.phase("select"):
            d = roundtrip_values(state.selector.select(e, k_for(n, density)), state.value_codec)
            state.ef.update(key, d)
        with c.phase("encode"):
            payload = encode(d, state.index_codec, state.value_codec)
        with c.phase("transfer"):
            payloads = tr.all_gather_bytes(payload)
        with c.phase("decode"):
            result = torch.zeros_like(grad)
            apply_mean_(payloads, n, lambda d, w: d.add_to(result, alpha=w))
        sent, recv = tr.wire_bytes([len(b) for b in payloads])
        c.add_sent(sent)
        c.add_received(recv)
        c.note(path="sparse", k=d.k, density=d.k / max(n, 1))
    if state.switch == "measured":
        chooser.observe(path, tr.max_over_ranks(time.perf_counter() - t0))
    if bucket.is_last():
        state.last_metrics = c.collect(sum(t.numel() for t in state.ef.residuals.values()), 4, P)
        state.iteration += 1
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(result)
    return fut
