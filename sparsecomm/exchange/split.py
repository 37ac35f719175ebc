"""Split sparse all-reduce: O(k) bytes per worker whatever P is (SparCML arXiv 1802.08021, Ok-Topk arXiv 2201.07598).

The flat index space [0, N) is cut into P contiguous shards, identical on every rank; rank j owns
shard j. One exchange of a worker's selected delta d (sorted global indices, values exactly as
receivers decode them):

    phase 1  sparse reduce-scatter: cut d at the shard bounds, encode each piece (local indices),
             all-to-all: owner j receives every worker's entries inside shard j       ~k/P each
    owner    decode every piece (validated), add them in rank order into its fp32 shard
             accumulator, which also holds its own error-feedback residual (sum units)
             exact:  send every nonzero of the sum (fp32 values; the residual stays zero)
             else:   send the top share = owner_share x k/P of the sum (value codec; owner_share
                     2 by default, OWNER_SHARE below), the rest
                     stays in the owner's residual: nothing dropped is lost, it is sent by a
                     later exchange (owner_share > 1 applies more of the union per step, for
                     more phase-2 bytes)
    phase 2  all-gather of the owners' pieces; every replica applies piece j at shard j's
             offset (the mean: exact pieces are already divided by P, re-sparsified ones are
             applied x 1/P), in owner order: the same bits everywhere.

Wire per worker ~ (1 + owner_share) (P-1)/P x k entries instead of the all-gather's (P-1) x k.

Failure is all-or-nothing: an owner that cannot decode a piece says so in the phase-2 size
exchange (a negative size), so every rank raises the same CodecError naming sender and owner;
nothing is committed on any rank before both phases succeeded (the caller's residual is reduced
by `commit`, the owner's accumulator is restored exactly from saved entries on failure).

Load balance: a histogram of selected indices (64 bins per rank) is summed over ranks every
`rebalance_every` exchanges and the bounds move to equal-count bin edges, so no owner receives
most of the mass. Owner residuals of a shard that moves are handed back to the owner's own
worker residual (in sum units, exactly), which sends them again under the new bounds.

    split = SplitAllReduce(numel, world_size, rank)
    pieces, alpha, commit = split.exchange(transport, e, d, k, index_codec, value_codec, comm)
    for piece in pieces: piece.add_to(weights, alpha)
    commit()                                              # e (the worker residual) -= d
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..codec import VALUE_CODECS, CodecError, encode, roundtrip_values
from ..compress import SampledThreshold, add_stochastic_, subtract_sent_
from ..delta import SparseDelta
from .aggregate import decode_from
from .torch_dist import SIZE_BYTES

# Owners send 2 x k/P entries of their summed shard by default: on the demo job at P = 2 the share
# k/P lost reward against the all-gather (-0.082 [-0.114, -0.050], results/convergence_split.md)
# and 2k/P is non-inferior to it (+0.002 [-0.010, +0.013], 10 pre-registered seeds,
# results/convergence_split2.md), for ~(1 + 2)(P-1)/P k entries per worker.
OWNER_SHARE = 2.0


def to_owners(transport, pieces: Sequence[SparseDelta], shard_numel: int, index_codec: str, value_codec: str, comm,
              own: SparseDelta | None = None) -> tuple[list[SparseDelta], str, int, int, int]:
    """A sparse reduce-scatter's first half: pieces[j] (indices local to owner j's shard) goes to rank j,
    in one all-to-all of encoded buffers; what every rank sent this one comes back decoded and
    validated, in rank order. This rank's own piece never goes through bytes (`own`: it as the owner
    would decode it; default pieces[me]); the all-to-all carries an empty buffer to itself.

    Returns (parts, error, sent_bytes, recv_bytes, payload_bytes). A piece that does not decode gives
    parts == [] and the reason in `error`, and nothing raised yet: only this owner knows, so the
    caller must tell every rank (the split path: in phase 2's size exchange; a bare reduce-scatter:
    a max over ranks) and raise everywhere alike, instead of leaving the others waiting in their
    next collective. Used by SplitAllReduce and by the FSDP2 1-D sparse reduce-scatter."""
    me, P = transport.rank, transport.world_size
    if len(pieces) != P:
        raise ValueError(f"to_owners needs one piece per rank ({P}), got {len(pieces)}")
    with comm.phase("encode"):
        bufs = [b"" if j == me else encode(p, index_codec, value_codec) for j, p in enumerate(pieces)]
    with comm.phase("transfer"):
        received = transport.all_to_all_bytes(bufs)
    payload = sum(len(b) for b in bufs)
    sent = payload + SIZE_BYTES * (P - 1)
    recv = sum(len(b) for r, b in enumerate(received) if r != me) + SIZE_BYTES * (P - 1)
    with comm.phase("decode"):
        try:
            parts = [(pieces[me] if own is None else own) if r == me else decode_from(r, buf, shard_numel)
                     for r, buf in enumerate(received)]
        except CodecError as err:
            return [], f"owner rank {me}: {err}", sent, recv, payload
    return parts, "", sent, recv, payload


class SplitAllReduce:
    """Shard bounds, owner accumulator (= owner residual) and load-balance histogram for one flat buffer."""

    def __init__(self, numel: int, world_size: int, rank: int, *, exact: bool = False, rebalance_every: int = 10,
                 bins_per_rank: int = 64, owner_selector=None, owner_share: float = OWNER_SHARE):
        if numel < 0 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad split geometry: numel={numel}, world_size={world_size}, rank={rank}")
        if rebalance_every < 0 or bins_per_rank < 1:
            raise ValueError("rebalance_every must be >= 0 (0: never) and bins_per_rank >= 1")
        if not owner_share > 0:
            raise ValueError(f"owner_share must be > 0 (x k/P entries per owner), got {owner_share}")
        self.numel, self.P, self.rank, self.exact, self.owner_share = numel, world_size, rank, exact, owner_share
        self.rebalance_every, self.bins = rebalance_every, bins_per_rank * world_size
        self.owner_selector = owner_selector or SampledThreshold(seed=rank)  # ranks |sum| inside the shard
        self.bounds = [numel * j // world_size for j in range(world_size + 1)]
        self.acc: torch.Tensor | None = None  # (shard,) fp32: owner residual, in sum units
        self.hist = torch.zeros(self.bins, dtype=torch.int64)  # selected entries per bin since the last rebalance
        self.exchanges = 0  # replicated
        self.last: dict = {}
        self.round_gen: torch.Generator | None = None  # flushes into a bf16 worker residual (stochastic rounding)

    # ------------------------------------------------------------------ shards
    @property
    def shard(self) -> tuple[int, int]:
        return self.bounds[self.rank], self.bounds[self.rank + 1]

    def _accumulator(self, device) -> torch.Tensor:
        lo, hi = self.shard
        if self.acc is None or self.acc.numel() != hi - lo:
            self.acc = torch.zeros(hi - lo, dtype=torch.float32, device=device)
        return self.acc

    def flush_(self, e: torch.Tensor) -> None:
        """Hand the owner residual back to this worker's residual `e` (sum units: exact into fp32; into a
        bf16 `e`, ASPG's state_dtype, rounded stochastically: unbiased), e.g. before a dense or
        all-gather exchange, or when the bounds move."""
        if self.acc is not None and self.acc.numel():
            lo, hi = self.shard
            if e.dtype == torch.float32:
                e[lo:hi].add_(self.acc.to(e.device))
            else:
                if self.round_gen is None:
                    self.round_gen = torch.Generator(device=e.device).manual_seed(104729 + self.rank)
                add_stochastic_(e[lo:hi], self.acc.to(e.device), self.round_gen)
            self.acc.zero_()

    def _rebalance(self, transport, e: torch.Tensor) -> None:
        hist = self.hist.to(torch.float64).to(getattr(transport, "device", "cpu"))
        transport.all_reduce_sum_(hist)  # identical on every rank: integer counts, exact in float64
        counts = hist.cpu().to(torch.int64)
        self.hist.zero_()
        total = int(counts.sum())
        if total == 0:
            return
        cum = torch.cumsum(counts, 0)
        width = self.numel / self.bins
        new = [0]
        for j in range(1, self.P):
            b = int(torch.searchsorted(cum, torch.tensor(math.ceil(j * total / self.P))))
            new.append(max(new[-1], min(self.numel, round((b + 1) * width))))
        new.append(self.numel)
        if new != self.bounds:
            self.flush_(e)
            self.bounds, self.acc = new, None

    # ------------------------------------------------------------------ one exchange
    def exchange(self, transport, e: torch.Tensor, d: SparseDelta, k: int, index_codec: str, value_codec: str,
                 comm) -> tuple[list[SparseDelta], float, Callable[[], None]]:
        """Both phases for the selected delta `d` (global indices). Returns the owners' pieces with
        global indices, the factor to apply them with (exact: 1, the owners already divided the sum by
        P, so the result equals the dense mean bit for bit; re-sparsified: 1/P, the pieces are sums and
        the owner residual is kept exactly in sum units) and `commit`, which reduces the caller's
        residual `e` by d; call it once the pieces were applied. Raises CodecError on every rank alike."""
        P, me = self.P, self.rank
        if self.rebalance_every and self.exchanges and self.exchanges % self.rebalance_every == 0:
            self._rebalance(transport, e)
        self.exchanges += 1
        dev = e.device
        closed = VALUE_CODECS[value_codec].closed_under_subsets
        with comm.phase("encode"):  # phase 1: cut at the shard bounds, local indices
            cuts = torch.searchsorted(d.indices, torch.tensor(self.bounds, device=d.indices.device)).tolist()
            pieces = [SparseDelta(d.indices[cuts[j]:cuts[j + 1]] - self.bounds[j], d.values[cuts[j]:cuts[j + 1]],
                                  (self.bounds[j + 1] - self.bounds[j],), d.dtype) for j in range(P)]
            # each piece is quantised on its own: for a codec not closed under subsets (int8: the piece's
            # absmax sets its scale) what the owner decodes is the piece's round trip, and that is what
            # leaves the residual; the others decode d's values unchanged (d is already round-tripped)
            if not closed and pieces:
                d = d.with_values(torch.cat([roundtrip_values(p, value_codec).values for p in pieces]))
        lo, hi = self.shard
        parts, error, sent_bytes, recv_bytes, payload = to_owners(
            transport, pieces, hi - lo, index_codec, value_codec, comm,
            own=pieces[me] if closed else roundtrip_values(pieces[me], value_codec))
        acc = self._accumulator(dev)
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (indices, previous values) to undo exactly
        out_buf, out = b"", None
        with comm.phase("decode"):  # owner: every piece was validated before the accumulator is touched
            for part in parts:  # rank order: every owner sums the same way
                idx = part.indices.to(dev)
                saved.append((idx, acc[idx].clone()))
                acc.index_add_(0, idx, part.values.to(dev, torch.float32))
        if not error:
            with comm.phase("select"):  # owner: what of the summed shard to send
                if self.exact or not parts:
                    idx = torch.nonzero(acc).squeeze(1)
                    out = SparseDelta(idx, acc[idx], (hi - lo,), torch.float32)
                    sent = out.with_values(out.values / P) if self.exact else out  # the mean, as dense / P
                else:
                    share = math.ceil(self.owner_share * k / P)
                    if max(p.k for p in parts) < share:  # the sum may hold fewer nonzeros: count (else skip the pass)
                        share = min(share, int(torch.count_nonzero(acc)))
                    out = sent = roundtrip_values(self.owner_selector.select(acc, share), value_codec)
            with comm.phase("encode"):
                out_buf = encode(sent, index_codec, "fp32" if self.exact else value_codec)
        with comm.phase("transfer"):  # phase 2: sizes (negative: an owner failed), then the pieces
            sizes = transport.all_gather_sizes(-1 if error else len(out_buf))
            failed = [j for j, s in enumerate(sizes) if s < 0]
            if not failed:
                gathered = transport.all_gather_sized(out_buf, sizes)
        try:
            if failed:
                raise CodecError(error or f"split all-reduce: owner rank(s) {failed} refused a phase-1 piece "
                                          f"(see their logs); nothing was applied")
            with comm.phase("decode"):
                owners = [decode_from(j, buf, self.bounds[j + 1] - self.bounds[j]) for j, buf in enumerate(gathered)]
        except CodecError:
            for idx, prev in reversed(saved):  # undo the accumulation, bit for bit
                acc[idx] = prev
            raise
        top = max(sizes)
        comm.add_sent(sent_bytes + (P - 1) * (top + SIZE_BYTES))
        comm.add_received(recv_bytes + (P - 1) * (top + SIZE_BYTES))
        self.last = {"shard_entries": sum(p.k for p in parts), "owner_sent_entries": out.k,
                     "aggregate_entries": sum(o.k for o in owners), "payload_bytes": payload}
        for j, o in enumerate(owners):
            o.indices = o.indices + self.bounds[j]
            o.shape = (self.numel,)

        def commit() -> None:
            subtract_sent_(acc, out)  # owner error feedback
            subtract_sent_(e, d)  # worker error feedback
            if d.k and self.rebalance_every:
                self.hist += torch.bincount((d.indices.cpu() * self.bins) // max(self.numel, 1), minlength=self.bins)

        return owners, (1.0 if self.exact else 1.0 / P), commit

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"bounds": list(self.bounds), "acc": None if self.acc is None else self.acc.clone(),
                "hist": self.hist.clone(), "exchanges": self.exchanges,
                "round_gen": None if self.round_gen is None else (str(self.round_gen.device), self.round_gen.get_state())}

    def load_state_dict(self, state: dict) -> None:
        if len(state["bounds"]) != self.P + 1 or state["bounds"][-1] != self.numel:
            raise ValueError(f"split state has bounds for {len(state['bounds']) - 1} ranks over {state['bounds'][-1]} "
                             f"entries; this exchange has {self.P} ranks over {self.numel}")
        self.bounds = list(state["bounds"])
        self.acc = None if state["acc"] is None else state["acc"].detach().to(torch.float32).clone()
        self.hist = state["hist"].clone()
        self.exchanges = state["exchanges"]
        saved = state.get("round_gen")  # absent in checkpoints from before bf16 residuals
        self.round_gen = None
        if saved is not None:
            self.round_gen = torch.Generator(device=saved[0])
            self.round_gen.set_state(saved[1])
