"""Sparse top-k DDP communication hook with error feedback, for plain DDP, Accelerate and TRL.

    from sparsecomm.exchange import SparseHookState, sparse_topk_hook
    state = SparseHookState(density=0.01)
    ddp_model.register_comm_hook(state, sparse_topk_hook)

Per gradient bucket: e = residual + grad, then one `SparseExchange` of e (pipeline.py: the same
component ASPG uses): top-k by threshold reuse, the split sparse all-reduce (or the all-gather,
or a dense all-reduce when it would move fewer bytes), error feedback on both sides; the bucket
becomes the mean of the workers' deltas. Density 1.0 (or a dense warm-up iteration) is a plain
all-reduce of e, which equals DDP's default hook.

Overlap: with `overlap=True` (the default) the hook hands each bucket to one background thread
and returns its future at once, so backward keeps computing the next buckets while this one is
selected, encoded and sent. One thread, one FIFO queue: every rank issues the collectives of
bucket 0, then bucket 1, ... in the same order, whatever order the futures complete in.
PyTorch's powerSGD_hook issues follow-up collectives from `.then()` callbacks, which lets ranks
interleave them differently with several buckets on gloo (size mismatches or hangs); this hook
cannot, and is tested with several buckets. DDP waits for every bucket's future before
`backward()` returns, so nothing else uses the process group meanwhile.

Error feedback here wraps the *gradient*, the only thing a DDP hook sees. Under Adam that is
the compression 1-bit Adam warned about (the second moment then sees compressed gradients);
prefer the ASPG optimizer, which compresses the Adam update itself, when you control the
optimizer. This hook is for when you do not (TRL/Accelerate training loops).

Bucket layout: DDP's first iteration uses its initial buckets (one bucket for the whole model in
torch 2.13), then rebuilds them, and a resumed run starts again from the initial ones. Selection
budgets and split shards are per bucket, so the hook keeps one layout for good: DDP's rebuilt
buckets, recorded at the hook's second iteration by parameter position (the order of the first
iteration's buckets, the same in every process of the same model). The very first iteration of
a fresh hook is therefore a dense all-reduce (exact, no residual yet). When a DDP bucket does
not match the kept layout (a resumed run's first iteration), its gradients are copied into the
"virtual" buckets that hold its parameters, each virtual bucket is exchanged as soon as all its
parameters arrived (in index order: the same on every rank), and every DDP bucket's future
completes once its parameters' results exist. Residuals never move or vanish, and a resumed run
continues bit for bit.

The state pickles (for checkpoints) with its residuals, the virtual layout, selector generators
and thresholds, path timings and split owner residuals; the process group and the thread are
recreated on first use. A checkpoint whose layout does not match the model's buckets is refused.
"""
# No `from __future__ import annotations` here: DDP checks the hook's annotations at runtime
# (`bucket: dist.GradBucket`, return `torch.futures.Future[torch.Tensor]`) and rejects string annotations.
import queue
import threading

import torch
import torch.distributed as dist

from ..codec import VALUE_CODECS
from ..compress import ErrorFeedback, k_for, make_selector
from ..track.comm import CommTracker, ring_allreduce_bytes
from .paths import PATHS, PathChooser
from .pipeline import DenseSink, SparseExchange

_HYPER = ("density", "selector_name", "index_codec", "value_codec", "dense_fallback", "fallback_margin",
          "warmup_iterations", "switch", "seed", "paths", "exact", "overlap", "owner_share")
_ADDED_HYPER_DEFAULTS = {"owner_share": 1.0}
# The hook's split owners send k/P entries each (ASPG's default, OWNER_SHARE = 2, was chosen on RL
# reward): on the DDP benchmark (results/ddp.md, 4 ranks, 25.2M MLP, 1%) a share of 1 sends 0.68x the
# bytes of 2 and is faster per step than powerSGD_hook on every link; a share of 2 reaches a lower loss
# per step (27.3 vs 29.9 after 24 steps, PowerSGD 37.0) but is slower per step than PowerSGD on
# loopback. Pass owner_share=2 for the loss per step.
HOOK_OWNER_SHARE = 1.0


class SparseHookState:
    __slots__ = (
        # hyperparameters the user tunes
        *_HYPER,
        # internal state
        "process_group", "exchange", "ef", "iteration", "comm", "last_metrics", "layout", "_worker",
        "_pending", "_order", "_vparams", "_where", "_iter", "_local_iterations",
    )

    def __init__(self, process_group=None, density: float = 0.01, selector: str = "reuse", index_codec: str = "auto",
                 value_codec: str = "bf16", dense_fallback: bool = True, fallback_margin: float = 1.0,
                 warmup_iterations: int = 0, switch: str = "volume", seed: int = 0, paths=PATHS, exact: bool = False,
                 overlap: bool = True, owner_share: float = HOOK_OWNER_SHARE):
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density}")
        if value_codec not in VALUE_CODECS:
            raise ValueError(f"unknown value codec {value_codec!r}; choose from {sorted(VALUE_CODECS)}")
        if warmup_iterations < 0 or fallback_margin <= 0:
            raise ValueError("warmup_iterations must be >= 0 and fallback_margin > 0")
        make_selector(selector)  # validates the name
        PathChooser(switch, candidates=paths)  # validates the policy and the paths
        self.density, self.selector_name, self.index_codec, self.value_codec = density, selector, index_codec, value_codec
        self.dense_fallback, self.fallback_margin, self.warmup_iterations, self.switch, self.seed = (
            dense_fallback, fallback_margin, warmup_iterations, switch, seed)
        self.paths, self.exact, self.overlap, self.owner_share = tuple(paths), exact, overlap, owner_share
        self.process_group = process_group
        self._init_internal()

    def _init_internal(self) -> None:
        self.exchange = None  # created on first use, after init_process_group
        self.ef = ErrorFeedback()
        self.iteration = 0
        self.comm = CommTracker()
        self.last_metrics: dict = {}
        self.layout: list[list[int]] | None = None  # virtual buckets: parameter positions (checkpointed)
        self._worker = None
        self._pending = None  # exchange state loaded from a checkpoint, applied when the exchange exists
        self._order: list[tuple[int, int]] = []  # (id, numel) of every parameter, in the first iteration's order
        self._vparams: list[list[int]] = []  # virtual bucket -> ids of its parameters (this process)
        self._where: dict[int, tuple[int, int, int]] = {}  # id(param) -> (virtual bucket, offset, numel)
        self._iter = _Iteration()
        self._local_iterations = 0  # iterations this process has run (0: DDP's initial buckets)

    def _exchange(self) -> SparseExchange:
        if self.exchange is None:
            from .torch_dist import TorchDistTransport

            paths = tuple(p for p in self.paths if self.dense_fallback or p != "dense")
            self.exchange = SparseExchange(TorchDistTransport(self.process_group), selector=self.selector_name,
                                           index_codec=self.index_codec, value_codec=self.value_codec, paths=paths,
                                           switch=self.switch, exact=self.exact, margin=self.fallback_margin,
                                           seed=self.seed, comm=self.comm, owner_share=self.owner_share)
            if self._pending is not None:
                self.exchange.load_state_dict(self._pending)
                self._pending = None
        return self.exchange

    def __getstate__(self):
        """Checkpointable: hyperparameters, residuals, layout, iteration and the exchange's state; never the group."""
        state = {name: getattr(self, name) for name in _HYPER}
        state.update(ef=self.ef.state_dict(), iteration=self.iteration, layout=self.layout,
                     exchange=self.exchange.state_dict() if self.exchange is not None else self._pending)
        return state

    def __setstate__(self, state):
        self.process_group = None
        for name in _HYPER:  # a checkpoint older than a hyperparameter holds its default
            setattr(self, name, state[name] if name in state else _ADDED_HYPER_DEFAULTS[name])
        self._init_internal()
        self.ef.load_state_dict(state["ef"])
        self.iteration, self._pending, self.layout = state["iteration"], state["exchange"], state["layout"]

    def _bind_layout(self) -> None:
        """Map the kept layout (parameter positions) onto this process's parameters."""
        if max((i for b in self.layout for i in b), default=-1) >= len(self._order):
            raise ValueError(f"this hook state's layout (from its checkpoint) names {sum(map(len, self.layout))} "
                             f"parameters, the model has {len(self._order)}: resume with the same model")
        self._vparams, self._where = [], {}
        for j, positions in enumerate(self.layout):
            ids, off = [], 0
            for i in positions:
                pid, n = self._order[i]
                ids.append(pid)
                self._where[pid] = (j, off, n)
                off += n
            saved = self.ef.residuals.get(f"v{j}")
            if saved is not None and saved.numel() != off:
                raise ValueError(f"hook checkpoint: bucket {j} has a residual of {saved.numel()} entries, its parameters "
                                 f"in this model {off}: resume with the same model")
            self._vparams.append(ids)

    def close(self) -> None:
        """Stop the background thread (it is a daemon; this is for tidy shutdowns and tests)."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None


class _Iteration:
    """Per-backward bookkeeping of the virtual buckets (never checkpointed: empty between iterations)."""

    def __init__(self):
        self.grads: dict[int, torch.Tensor] = {}  # virtual bucket -> its gradients (copied from DDP buckets)
        self.have: dict[int, int] = {}  # virtual bucket -> parameters received
        self.results: dict[int, torch.Tensor] = {}  # virtual bucket -> exchanged mean
        self.waiting: list = []  # (future, result, [(param id, offset, numel)]) of DDP buckets not yet complete
        self.deferred: list = []  # a resumed run's first buckets, held until every parameter's position is known
        self.ready: list = []  # (future, result) to complete at the end of this job


class _BucketWorker:
    """One daemon thread running bucket jobs in submission order (= bucket order on every rank)."""

    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="sparsecomm-ddp-hook", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            job()

    def submit(self, job) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)


def _exchange_bucket(state: SparseHookState, j: int, grad: torch.Tensor) -> torch.Tensor:
    """error feedback + one SparseExchange of virtual bucket j's gradient -> the mean over workers."""
    ex = state._exchange()
    key = f"v{j}"
    # e += grad happens inside the selection pass, which also zeroes grad (one pass over memory instead
    # of three); the mean then goes into the bucket's own buffer, as DDP's hook does (no 25 MB allocation)
    e, pending = state.ef.deferred(key, grad)
    if pending is None:
        grad.zero_()
    density = 1.0 if state.iteration < state.warmup_iterations else state.density
    ex.exchange(key, e, k_for(grad.numel(), density), DenseSink(grad), move_in=pending)
    return grad


def _on_bucket(state: SparseHookState, params: list[tuple[int, int]], grad: torch.Tensor, is_last: bool,
               fut: torch.futures.Future) -> None:
    """Everything the hook does for one DDP bucket (inline, or on the background thread)."""
    it = state._iter
    try:
        if state._local_iterations == 0:  # DDP's initial buckets: learn the parameter order
            state._order += params
        if state.layout is None:
            if state._local_iterations == 0:  # a fresh hook's first iteration: dense, exact, no residual
                ex, c = state._exchange(), state.comm
                result = grad.clone()
                with c.phase("exchange"), c.phase("transfer"):
                    ex.transport.all_reduce_mean_(result)
                vol = ring_allreduce_bytes(grad.numel(), 4, ex.world_size)
                c.add_sent(vol)
                c.add_received(vol)
                c.note(path="dense", k=grad.numel(), density=1.0)
                it.ready.append((fut, result))
            else:  # the second iteration: DDP's rebuilt buckets become the kept layout
                pos = {pid: i for i, (pid, _) in enumerate(state._order)}
                state._vparams.append([pid for pid, _ in params])
                off = 0
                for pid, n in params:
                    state._where[pid] = (len(state._vparams) - 1, off, n)
                    off += n
                it.ready.append((fut, _exchange_bucket(state, len(state._vparams) - 1, grad)))
                if is_last:
                    state.layout = [[pos[pid] for pid in ids] for ids in state._vparams]
        else:
            if not state._where:
                if not is_last and state._local_iterations == 0:
                    # a resumed run: positions are known once the first iteration listed every parameter
                    it.deferred.append((params, grad, fut))
                    return
                state._bind_layout()
                for dparams, dgrad, dfut in it.deferred:
                    _virtual(state, it, dparams, dgrad, dfut)
                it.deferred = []
            _virtual(state, it, params, grad, fut)
        if is_last:
            if it.waiting:
                raise RuntimeError(f"{len(it.waiting)} DDP bucket(s) still wait for parameters that never arrived")
            ex = state._exchange()
            state.last_metrics = state.comm.collect(sum(t.numel() for t in state.ef.residuals.values()), 4, ex.world_size)
            state.iteration += 1
            state._local_iterations += 1
            state._iter = _Iteration()
        # complete futures only now: DDP resumes the main thread at the last one, and the bookkeeping
        # above (iteration, metrics) must already be done when it looks (a checkpoint, say)
        for f, res in it.ready:
            f.set_result(res)
        it.ready = []
    except BaseException as err:  # noqa: BLE001 - handed to DDP, which raises it in backward()
        for f in [w[0] for w in it.waiting] + [d[2] for d in it.deferred] + [r[0] for r in it.ready]:
            if not f.done():
                f.set_exception(err)
        if not fut.done():
            fut.set_exception(err)
        state._iter = _Iteration()


def _offsets(numels: list[int]) -> list[int]:
    out, off = [], 0
    for n in numels:
        out.append(off)
        off += n
    return out


def _virtual(state: SparseHookState, it: "_Iteration", params: list, grad: torch.Tensor, fut) -> None:
    """One DDP bucket against the kept layout: direct when it is a kept bucket, else through copies."""
    j = state._where[params[0][0]][0]
    if [pid for pid, _ in params] == state._vparams[j] and not it.have.get(j):
        it.ready.append((fut, _exchange_bucket(state, j, grad)))  # the same bucket as the kept one: no copies
        return
    off = 0
    for pid, n in params:
        vj, voff, _ = state._where[pid]
        buf = it.grads.get(vj)
        if buf is None:
            size = sum(state._where[q][2] for q in state._vparams[vj])
            buf = it.grads[vj] = torch.empty(size, dtype=grad.dtype, device=grad.device)
        buf[voff:voff + n].copy_(grad[off:off + n])
        it.have[vj] = it.have.get(vj, 0) + 1
        off += n
    it.waiting.append((fut, torch.empty_like(grad), [(pid, o, n) for (pid, n), o in zip(params, _offsets([n for _, n in params]))]))
    for vj in sorted(it.grads):  # index order: the same collective order on every rank
        if vj not in it.results and it.have[vj] == len(state._vparams[vj]):
            it.results[vj] = _exchange_bucket(state, vj, it.grads[vj])
    still = []
    for f, res, ps in it.waiting:
        if all(state._where[pid][0] in it.results for pid, _, _ in ps):
            for pid, o, n in ps:
                vj, voff, _ = state._where[pid]
                res[o:o + n].copy_(it.results[vj][voff:voff + n])
            it.ready.append((f, res))
        else:
            still.append((f, res, ps))
    it.waiting = still


def sparse_topk_hook(state: SparseHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    # (n,) flattened gradients of this bucket, summed by nobody yet; DDP leaves it alone until the future completes
    grad = bucket.buffer()
    params = [(id(p), p.numel()) for p in bucket.parameters()]
    if sum(n for _, n in params) != grad.numel():
        raise RuntimeError(f"DDP bucket {bucket.index()}: {grad.numel()} gradient entries but its parameters have "
                           f"{sum(n for _, n in params)}: unsupported bucket layout")
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    if not state.overlap:
        _on_bucket(state, params, grad, bucket.is_last(), fut)
        return fut
    if state._worker is None:
        state._worker = _BucketWorker()
    is_last = bucket.is_last()
    state._worker.submit(lambda: _on_bucket(state, params, grad, is_last, fut))
    return fut
