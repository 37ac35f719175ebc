"""Publishing to rollout (inference) workers: after every aggregate, exactly the bf16 entries whose
bits changed (`bf16_values`: a bf16 copy stays equal to bf16(canonical fp32 weights), bit for bit),
or the fp32 delta itself (`delta`); a full `anchor` every `anchor_every` versions.

Patches stay in the shape an inference engine applies in place: flat int32-coded indices and
exact bf16 values of one tensor (the coordinator's flat weights).

Weight decay touches every weight of a decayed range, so a round with decay compares the whole
range (not just the aggregate's indices) against the bf16 view; only entries whose bf16 bits
changed are sent - with a small lr*wd most weights keep their bf16 bits, so the patch stays sparse.
"""
from __future__ import annotations

import torch

from ...codec import encode
from ...delta import SparseDelta
from .. import chunks
from ..protocol import Decay, decay_wire, pack
from .state import State


class RolloutPublisher:
    def __init__(self, cfg, state: State, send):
        self.cfg, self.state, self.send = cfg, state, send  # send(identity, header, *frames)
        self.bf16_view: torch.Tensor | None = None  # bf16(weights) as rollout workers hold it

    def reset(self) -> None:
        """The weights were (re)initialised or restored: rebuild the bf16 view from them."""
        w = self.state.weights
        self.bf16_view = w.to(torch.bfloat16) if self.cfg.rollout_bf16 and w is not None else None

    def _touched(self, applied: SparseDelta, decay: Decay) -> torch.Tensor:
        """Flat indices this version may have changed: the aggregate's, and every decayed range."""
        if not decay:
            return applied.indices
        ranges = [torch.arange(a, b, dtype=torch.int64) for a, b, _ in decay]
        return torch.unique(torch.cat([applied.indices.to(torch.int64), *ranges]))  # sorted, no repeats

    def publish(self, applied: SparseDelta, peers, decay: Decay = ()) -> None:
        """Send this version's change to every in-sync rollout peer (and keep the view current)."""
        st = self.state
        if not peers:
            if self.bf16_view is not None:  # keep the view current for rollout workers that join later
                idx = self._touched(applied, decay)
                self.bf16_view[idx] = st.weights[idx].to(torch.bfloat16)
            return
        if self.cfg.rollout_bf16:
            # Only entries touched by this aggregate (or its decay) can change; send those whose bf16 bits changed.
            idx = self._touched(applied, decay)
            new = st.weights[idx].to(torch.bfloat16)
            changed = new.view(torch.int16) != self.bf16_view[idx].view(torch.int16)
            self.bf16_view[idx] = new
            d = SparseDelta(idx[changed], new[changed], (st.numel,), torch.bfloat16)
            payload, kind = encode(d, "auto", "bf16"), "bf16_values"
        else:
            payload, kind = encode(applied, "auto", self.cfg.value_codec), "delta"
        header = pack("rollout", version=st.version, hash=st.hash, kind=kind, decay=decay_wire(decay))
        send_version(self.send, peers, st.version, header, payload, self.cfg.anchor_every, self.send_anchor)

    def send_anchor(self, identity: bytes) -> None:
        src = self.bf16_view if self.cfg.rollout_bf16 else self.state.weights
        send_tensor(self.send, identity, "anchor", self.state, src,
                    dtype="bfloat16" if src.dtype == torch.bfloat16 else "float32")


def send_version(send, peers, version: int, header: bytes, payload: bytes, anchor_every: int, send_anchor) -> int:
    """One version's `rollout` message to every peer (and `send_anchor(identity)` every `anchor_every`
    versions); marks the peers at `version`. Returns the rollout bytes sent (anchors not included)."""
    anchor = anchor_every and version % anchor_every == 0
    for p in peers:
        send(p.identity, header, payload)
        if anchor:
            send_anchor(p.identity)
        p.version = version
    return len(peers) * (len(header) + len(payload))


def send_tensor(send, identity: bytes, op: str, state: State, tensor: torch.Tensor, **fields) -> None:
    """A whole tensor to one peer in chunks (chunks.py), each header stamped with the current version."""
    for where, chunk in chunks.split(chunks.raw_bytes(tensor)):
        send(identity, pack(op, version=state.version, hash=state.hash, **where, **fields), chunk)
