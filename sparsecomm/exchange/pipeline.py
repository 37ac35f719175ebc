"""The sparse exchange, written once: ASPG, the DDP hook and the benchmarks all call `SparseExchange`.

One exchange of a worker's flat residual `e` (its error-feedback buffer, fp32 or, with ASPG's
state_dtype, bf16; already holding this step's update), for a budget of k entries:

    path = chooser.choose(...)            dense | allgather | split, identical on every rank
    d    = select(e, k)                   (k,) sorted indices, e's values there
    d    = roundtrip(d, value_codec)      what receivers will decode
    allgather: encode -> all_gather -> decode all -> apply each x 1/P in rank order
    split:     split.SplitAllReduce (reduce-scatter to shard owners, owner top-k with owner
               residual, all-gather of the owners' pieces) -> apply each x 1/P in owner order
    dense:     all_reduce_mean(e) -> apply e                          (e is then all sent)
    e -= d                                only after the exchange succeeded: a failed exchange
                                          raises with nothing applied and nothing lost

The result goes into a `Sink`: `FlatLayout` (a model's parameters, for ASPG; fp32 master
copies for low-precision parameters so that no applied entry is rounded away) or `DenseSink`
(a DDP bucket). Bytes are counted from the buffers actually sent; phases are timed in `comm`
(select, encode, transfer, decode, apply, and the whole exchange with its CPU seconds).

    ex = SparseExchange(TorchDistTransport(), value_codec="bf16")
    path = ex.exchange("flat", e, k, FlatLayout(params))
"""
from __future__ import annotations

import time
from typing import Callable, Protocol, Sequence

import torch

from ..codec import VALUE_CODECS, encode, roundtrip_values
from ..compress import load_selector_state, make_selector, selector_state, subtract_sent_
from ..delta import SparseDelta
from ..track.comm import CommTracker, ring_allreduce_bytes
from .aggregate import apply_mean_, decode_all
from .paths import PATHS, PathChooser
from .split import OWNER_SHARE, SplitAllReduce
from .transport import LocalTransport


class Sink(Protocol):
    def add_sparse(self, d: SparseDelta, alpha: float) -> None: ...

    def add_dense(self, flat: torch.Tensor) -> None: ...


class DenseSink:
    """Accumulate into one dense tensor (a DDP bucket's result)."""

    def __init__(self, out: torch.Tensor):
        self.out = out

    def add_sparse(self, d: SparseDelta, alpha: float) -> None:
        d.add_to(self.out, alpha)

    def add_dense(self, flat: torch.Tensor) -> None:
        self.out.add_(flat.view_as(self.out))


class FlatLayout:
    """Where each parameter lives in the flat buffer, and how a flat delta is added to the parameters.

    `masters` (optional, one fp32 tensor or None per parameter): for bf16/fp16 parameters, the
    update is added to the fp32 master copy and the parameter is rewritten from it, so an entry
    smaller than half a bf16 ulp of its weight accumulates instead of being rounded away.
    """

    def __init__(self, params: Sequence[torch.Tensor], masters: Sequence[torch.Tensor | None] | None = None):
        self.params = list(params)
        self.masters = list(masters) if masters is not None else [None] * len(self.params)
        self.offsets, off = [], 0
        for p in self.params:
            self.offsets.append(off)
            off += p.numel()
        self.numel = off
        self._bounds = torch.tensor(self.offsets + [off], dtype=torch.int64)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter views of a flat buffer."""
        return [flat[o:o + p.numel()].view_as(p) for p, o in zip(self.params, self.offsets)]

    def flatten(self, tensors: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """One flat fp32 copy of the parameters (or of `tensors` laid out like them)."""
        ts = self.params if tensors is None else tensors
        return torch.cat([t.detach().reshape(-1).float() for t in ts]) if ts else torch.empty(0)

    def add_sparse(self, d: SparseDelta, alpha: float) -> None:
        cuts = torch.searchsorted(d.indices, self._bounds.to(d.indices.device)).tolist()
        for i, (p, off) in enumerate(zip(self.params, self.offsets)):
            lo, hi = cuts[i], cuts[i + 1]
            if lo == hi:
                continue
            idx = d.indices[lo:hi].to(p.device) - off
            vals = d.values[lo:hi].to(p.device, torch.float32)
            if alpha != 1.0:
                vals = vals * alpha
            m = self.masters[i]
            if m is None:
                p.data.view(-1).index_add_(0, idx, vals.to(p.dtype))
            else:
                mv = m.view(-1)
                mv.index_add_(0, idx, vals)
                p.data.view(-1)[idx] = mv[idx].to(p.dtype)

    def add_dense(self, flat: torch.Tensor) -> None:
        for p, m, view in zip(self.params, self.masters, self.views(flat)):
            if m is None:
                p.data.add_(view.to(p.dtype))
            else:
                m.add_(view)
                p.data.copy_(m)


class SparseExchange:
    """select -> roundtrip -> encode -> transport -> decode -> apply, with one path choice per exchange.

    Hyperparameters: `paths` the candidates the switch may pick ("dense", "allgather", "split";
    leave out "dense" to never fall back), `switch` ("volume": fewest predicted bytes; "measured":
    also time the candidates), `exact` (split path without owner re-sparsification), the codecs,
    `selector` (name; one stateful instance per key), `rebalance_every` (split shard bounds),
    `owner_share` (split path: each owner sends owner_share x k/P entries of its summed shard).
    State (checkpointable, `state_dict`): per key the selector's generator and threshold, the
    chooser's timings, and the split path's bounds and owner residual.
    """

    def __init__(self, transport=None, *, selector: str = "reuse", index_codec: str = "auto", value_codec: str = "bf16",
                 paths: Sequence[str] = PATHS, switch: str = "volume", exact: bool = False, margin: float = 1.0,
                 probe_every: int = 50, rebalance_every: int = 10, seed: int = 0, comm: CommTracker | None = None,
                 owner_share: float = OWNER_SHARE):
        if value_codec not in VALUE_CODECS:
            raise ValueError(f"unknown value codec {value_codec!r}; choose from {sorted(VALUE_CODECS)}")
        make_selector(selector)  # validates the name
        measured_codecs = switch == "measured" and index_codec == "auto"
        # the measured switch also decides raw vs entropy-coded indices, from what each costs end to end
        candidates = [f"{p}:{c}" for p in paths for c in (("raw", "auto") if measured_codecs and p != "dense" else (None,))]
        candidates = [c.removesuffix(":None") for c in candidates]
        self.chooser_args = dict(policy=switch, candidates=candidates, margin=margin, probe_every=probe_every,
                                 index_codec=index_codec, exact=exact, owner_share=owner_share)
        PathChooser(**self.chooser_args)  # validates
        self.transport = transport or LocalTransport()
        self.selector_name, self.index_codec, self.value_codec = selector, index_codec, value_codec
        self.exact, self.rebalance_every, self.seed, self.switch = exact, rebalance_every, seed, switch
        self.owner_share = owner_share
        self.comm = comm or CommTracker()
        self.keys: dict[str, dict] = {}  # per buffer: selector, chooser, split state

    @property
    def world_size(self) -> int:
        return self.transport.world_size

    def _key(self, key: str, numel: int) -> dict:
        st = self.keys.get(key)
        if st is None or st["numel"] != numel:
            kw = {"seed": self.seed + len(self.keys)} if self.selector_name in ("sampled", "reuse", "randomk") else {}
            st = self.keys[key] = {"numel": numel, "selector": make_selector(self.selector_name, **kw),
                                   "chooser": PathChooser(**self.chooser_args), "split": None}
        return st

    def _split(self, st: dict) -> SplitAllReduce:
        if st["split"] is None:
            tr = self.transport
            st["split"] = SplitAllReduce(st["numel"], tr.world_size, tr.rank, exact=self.exact,
                                         rebalance_every=self.rebalance_every, owner_share=self.owner_share,
                                         owner_selector=make_selector("reuse", seed=self.seed + 7919 * (tr.rank + 1)))
        return st["split"]

    def choose(self, key: str, numel: int, k: int) -> str:
        return self._key(key, numel)["chooser"].choose(numel, k, self.world_size,
                                                       VALUE_CODECS[self.value_codec].bytes_per_value)

    def exchange(self, key: str, e: torch.Tensor, k: int, sink: Sink,
                 select: Callable | None = None, path: str | None = None, move_in: torch.Tensor | None = None) -> str:
        """Exchange `k` entries of the flat residual `e` (modified: what was sent leaves it).
        `select(selector) -> SparseDelta` overrides the default top-k by |e| (ASPG ranks by
        importance, or per tensor); `path` forces a candidate; `move_in` is still to be added to e
        (and is zeroed): the default selector does it inside its pass over e (`ErrorFeedback.deferred`).
        Returns the candidate that ran."""
        c, P, n = self.comm, self.world_size, e.numel()
        st = self._key(key, n)
        cand = path or self.choose(key, n, k)
        route, _, codec = cand.partition(":")
        codec = codec or self.index_codec
        if move_in is not None and (route == "dense" or select is not None
                                    or not getattr(st["selector"], "fuses_move_in", False)):  # no fused pass
            e.add_(move_in.view_as(e))
            move_in.zero_()
            move_in = None
        if st["split"] is not None and route != "split":
            self._split(st).flush_(e)  # owner residuals go back into e before another path sends e
        t0, cpu0 = time.perf_counter(), time.process_time()
        with c.phase("exchange"):
            if route == "dense":
                mean = e if e.dtype == torch.float32 else e.float()  # a bf16 residual (ASPG state_dtype): fp32 sum
                with c.phase("transfer"):
                    self.transport.all_reduce_mean_(mean)
                with c.phase("apply"):
                    sink.add_dense(mean)
                    e.zero_()
                vol = ring_allreduce_bytes(n, 4, P)
                c.add_sent(vol)
                c.add_received(vol)
                c.note(path="dense", k=n, density=1.0)
            else:
                with c.phase("select"):
                    d = (select(st["selector"]) if select is not None else st["selector"].select(e, k) if move_in is None
                         else st["selector"].select(e, k, move_in=move_in))
                    d = roundtrip_values(d, self.value_codec)
                if route == "allgather":
                    commit, applied_k = self._allgather(e, d, codec, sink)
                else:
                    split = self._split(st)
                    owners, alpha, commit = split.exchange(self.transport, e, d, k, codec, self.value_codec, c)
                    with c.phase("apply"):
                        for o in owners:
                            sink.add_sparse(o, alpha)
                        applied_k = sum(o.k for o in owners)
                    c.note(**split.last)
                commit()
                c.note(path=route, k=d.k, density=d.k / max(n, 1), applied_entries=applied_k, index_codec=codec)
        c.note(exchange_cpu_s=time.process_time() - cpu0)
        if self.switch == "measured":
            st["chooser"].observe(cand, self.transport.max_over_ranks(time.perf_counter() - t0))
        return cand

    def _allgather(self, e: torch.Tensor, d: SparseDelta, codec: str, sink: Sink):
        c = self.comm
        with c.phase("encode"):
            payload = encode(d, codec, self.value_codec)
        with c.phase("transfer"):
            payloads = self.transport.all_gather_bytes(payload)
        with c.phase("decode"):
            deltas = decode_all(payloads, e.numel())  # all validated before anything is applied
        with c.phase("apply"):
            applied_k = apply_mean_(deltas, sink.add_sparse)
        sent, recv = self.transport.wire_bytes([len(b) for b in payloads])
        c.add_sent(sent)
        c.add_received(recv)
        c.note(payload_bytes=len(payload))

        def commit() -> None:
            subtract_sent_(e, d)

        return commit, applied_k

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        out = {}
        for key, st in self.keys.items():
            out[key] = {"numel": st["numel"], "chooser": st["chooser"].state_dict(), **selector_state(st["selector"]),
                        "split": None if st["split"] is None else {
                            **st["split"].state_dict(),
                            "owner_generator": st["split"].owner_selector.generator.get_state(),
                            "owner_threshold": st["split"].owner_selector.threshold}}
        return out

    def load_state_dict(self, state: dict) -> None:
        self.keys = {}
        for key, s in state.items():
            st = self._key(key, s["numel"])
            st["chooser"].load_state_dict(s["chooser"])
            load_selector_state(st["selector"], s)
            if s["split"] is not None:
                split = self._split(st)
                split.load_state_dict(s["split"])
                split.owner_selector.generator.set_state(s["split"]["owner_generator"])
                split.owner_selector.threshold = s["split"]["owner_threshold"]
