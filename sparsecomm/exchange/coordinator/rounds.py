"""Rounds: one push per trainer per round, late deltas folded or dropped, and closing a round
into an aggregate that extends the hash chain.

    mean   = mean over contributors of their deltas (union of indices), late deltas folded in
    out    = mean, or top-k(residual + mean) with coordinator-side error feedback (resparsify)
    W     *= decay (per flat range);  W += decode(encode(out));  version += 1
    hash   = sha256(hash || payload || decay)

Weight decay: ASPG decays every replica's weights locally each step (W *= 1 - lr*wd per param
group, decoupled, never sent as a delta). The coordinator's canonical copy - what late joiners
get as a snapshot and rollout workers as bf16 patches - must decay the same way, so each push
names the decay its sender applied since its previous push; all on-time contributors of a round
must agree (they share lr, wd and step: replicated state), or the push is refused
(`decay_mismatch`), and the coordinator applies that decay before adding the mean, in the
trainers' order and with the trainers' fp32 multiply: bit for bit the trainers' weights.

Pushes are idempotent: a worker that re-sends a push (its reply was lost, it timed out, the
coordinator restarted) is told what already happened to that delta - `ack` while its round is
open, or the very aggregate that counted it - and the delta is never added twice. Payloads
are decoded with tight codec limits (one flat tensor, a header of at most 4 KiB) checked from
the length prefix before msgpack sees a byte, so a hostile payload costs at most its own size.
"""
from __future__ import annotations

import hashlib
import time

import torch

from ...codec import CodecError, Limits, decode, encode
from ...compress import ErrorFeedback, SampledThreshold, k_for
from ...delta import SparseDelta
from ..aggregate import mean_of_deltas
from ..protocol import Decay, ProtocolError, apply_decay, chain, decay_wire
from .state import Aggregate, State

# A push carries exactly one flat tensor whose codec header is ~150 bytes.
PUSH_LIMITS = Limits(max_header_bytes=4096, max_tensors=1, max_ndim=1, max_name_chars=64)


def digest(payload, decay: Decay = ()) -> bytes:
    """Identifies a push (payload and decay), so a re-sent push is recognised as the same delta."""
    h = hashlib.blake2b(memoryview(payload).cast("B"), digest_size=16)
    h.update(repr(decay_wire(decay)).encode())
    return h.digest()


class Rounds:
    def __init__(self, cfg, state: State, metrics):
        self.cfg, self.state, self.metrics = cfg, state, metrics
        self.pending: dict[str, tuple[SparseDelta, bytes]] = {}  # worker -> (delta, push digest), this round
        self.decay: Decay | None = None  # the open round's decay, set by its first push; all others must agree
        self.late: dict[str, tuple[int, SparseDelta, bytes]] = {}  # worker -> (round pushed for, delta, digest)
        self.started: float | None = None  # monotonic time of this round's first push
        self.ef = ErrorFeedback()  # resparsify: the coordinator's residual ("agg")
        self.selector = SampledThreshold(seed=0)

    # ------------------------------------------------------------------ pushes
    def decode(self, payload) -> SparseDelta:
        """A validated push payload, values in fp32."""
        try:
            d = decode(payload, PUSH_LIMITS)
        except CodecError as e:
            raise ProtocolError("bad_payload", str(e)) from None
        if d.shape != (self.state.numel,):
            raise ProtocolError("shape_mismatch", f"delta shape {d.shape}, model has ({self.state.numel},)")
        if d.k and float(d.values.abs().max()) > self.cfg.max_abs_value:
            raise ProtocolError("value_out_of_range", f"|value| {float(d.values.abs().max()):.3g} > {self.cfg.max_abs_value}")
        return d.with_values(d.values.float())

    def push(self, worker: str, rnd: int, base: int, payload, n_trainers: int,
             decay: Decay = ()) -> tuple[str, Aggregate | None]:
        """Take a trainer's push. Returns what to answer:
        ("pending", None) counted in the open round (the aggregate is the reply);
        ("ack", None)     a re-send of a delta already counted in the open round or the late buffer;
        ("reply", agg)    a re-send of a delta that `agg` (the aggregate of round `rnd`) accounts for;
        ("late", agg)     folded into the next round; `agg` (round `rnd`'s aggregate, if retained) is the reply."""
        st = self.state
        if rnd > st.round or base > st.version:
            raise ProtocolError("bad_field", f"push for round {rnd} / version {base} from the future (now {st.round} / {st.version})")
        dg = digest(payload, decay)
        if rnd == st.round and base == st.version:
            if worker in self.pending:
                if self.pending[worker][1] == dg:
                    return "ack", None
                raise ProtocolError("duplicate", f"worker {worker!r} already pushed a different delta for round {rnd}")
            if self.decay is not None and decay != self.decay:
                raise ProtocolError("decay_mismatch", f"worker {worker!r} decayed its weights by {decay_wire(decay)} "
                                    f"in round {rnd}, the round's other trainers by {decay_wire(self.decay)}: "
                                    "lr / weight_decay / step differ between trainers")
            self.pending[worker] = (self.decode(payload), dg)
            self.decay = decay
            if self.started is None:
                self.started = time.monotonic()
            return "pending", None
        # round `rnd` is closed: was this delta already accounted for?
        agg = st.find(rnd)
        if worker in self.late and self.late[worker][0] == rnd and self.late[worker][2] == dg:
            return ("reply", agg) if agg is not None else ("ack", None)
        if any(a.counts(worker, rnd) for a in st.retained if a.round >= rnd):
            if agg is None:
                raise ProtocolError("stale", f"round {rnd} is no longer retained")
            return "reply", agg
        if agg is not None and decay != agg.decay:  # its round decayed the weights differently from this trainer
            raise ProtocolError("decay_mismatch", f"late push for round {rnd} decayed by {decay_wire(decay)}, "
                                f"that round's aggregate by {decay_wire(agg.decay)}")
        self.metrics.late.labels(action=self.cfg.late).inc()
        if self.cfg.late == "drop":
            raise ProtocolError("stale", f"round {rnd} already closed (now {st.round}); delta dropped")
        if worker in self.late or len(self.late) >= max(1, n_trainers):
            raise ProtocolError("stale", "late-delta buffer full (one per trainer); delta dropped")
        self.late[worker] = (rnd, self.decode(payload), dg)
        return "late", agg

    def counted_since(self, worker: str, since: int) -> dict:
        """Which of `worker`'s pushes for rounds >= `since` are (or will be, being pending or buffered
        late) in an aggregate: {"counted": [rounds], "known_from": the oldest round this answer covers}.
        A round before `known_from` closed before the oldest retained aggregate: its fate is unknown."""
        st = self.state
        rounds = {a.round for a in st.retained if worker in a.contributors}
        rounds |= {r for a in st.retained for w, r in a.late if w == worker}
        if worker in self.pending:
            rounds.add(st.round)
        if worker in self.late:
            rounds.add(self.late[worker][0])
        known_from = st.retained[0].round if st.retained else st.round
        return {"counted": sorted(r for r in rounds if r >= since), "known_from": known_from}

    def drop(self, worker: str) -> None:
        """A worker left or rejoined from a new connection: its open-round push goes (it will re-push)."""
        self.pending.pop(worker, None)
        if not self.pending:
            self.decay = None

    # ------------------------------------------------------------------ closing
    def close(self) -> tuple[Aggregate, SparseDelta, bytes | None]:
        """Close the open round: (aggregate, the delta every replica applies, the exact mean payload
        when resparsifying - the journal needs it to replay the residual)."""
        st, cfg = self.state, self.cfg
        contributors = sorted(self.pending)
        late = sorted((w, r) for w, (r, _, _) in self.late.items())  # sorted: the same order after a restart
        deltas = [self.pending[w][0] for w in contributors] + [self.late[w][1] for w, _ in late]
        mean = mean_of_deltas(deltas, st.numel, sum(d.k for d in deltas))
        out, mean_payload = mean, None
        if cfg.resparsify_density > 0:
            mean_payload = encode(mean, "auto", "fp32")  # lossless: replayed from the journal bit for bit
            e = self.ef.compensate("agg", mean.to_dense())
            out = self.selector.select(e, k_for(st.numel, cfg.resparsify_density))
        payload = encode(out, "auto", cfg.value_codec)
        applied = decode(payload)  # what every replica will apply, bit for bit
        if cfg.resparsify_density > 0:
            self.ef.update("agg", applied)
        decay = self.decay or ()  # agreed by every on-time contributor; late deltas were checked against their round
        agg = Aggregate(st.version + 1, st.round, st.hash, chain(st.hash, payload, decay), payload, tuple(contributors),
                        tuple(late), decay)
        self._advance(agg, applied)
        if self.started is not None:
            self.metrics.latency.observe(time.monotonic() - self.started)
        self.pending.clear()
        self.late.clear()
        self.started = None
        self.decay = None
        return agg, applied, mean_payload

    def _advance(self, agg: Aggregate, applied: SparseDelta) -> None:
        st = self.state
        apply_decay(st.weights, agg.decay)  # first the decay every trainer applied locally, then the mean
        applied.add_to(st.weights)
        st.version, st.hash, st.round = agg.version, agg.hash, agg.round + 1
        st.retained.append(agg)
        self.metrics.rounds.inc()
        self.metrics.version.set(st.version)

    def selector_state(self) -> torch.Tensor:
        return self.selector.generator.get_state()

    def replay(self, agg: Aggregate, mean_payload: bytes | None, selector_state: bytes | None) -> bool:
        """Re-apply a journalled round after a restart; False (and nothing changed) if it does not follow."""
        st = self.state
        if agg.version != st.version + 1 or agg.parent_hash != st.hash or chain(st.hash, agg.payload, agg.decay) != agg.hash:
            return False
        applied = decode(agg.payload)
        if self.cfg.resparsify_density > 0 and mean_payload is not None:
            self.ef.compensate("agg", decode(mean_payload).to_dense())  # the same two fp32 ops as close()
            self.ef.update("agg", applied)
            if selector_state is not None:
                self.selector.generator.set_state(torch.frombuffer(bytearray(selector_state), dtype=torch.uint8))
        self._advance(agg, applied)
        return True
