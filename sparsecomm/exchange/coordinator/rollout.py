"""Publishing to rollout (inference) workers: after every aggregate, exactly the bf16 entries whose
bits changed (`bf16_values`: a bf16 copy stays equal to bf16(canonical fp32 weights), bit for bit),
or the fp32 delta itself (`delta`); a full `anchor` every `anchor_every` versions.

Patches stay in the shape an inference engine applies in place: flat int32-coded indices and
exact bf16 values of one tensor (the coordinator's flat weights).
"""
from __future__ import annotations

import torch

from ...codec import encode
from ...delta import SparseDelta
from .. import chunks
from ..protocol import pack
from .state import State


class RolloutPublisher:
    def __init__(self, cfg, state: State, send):
        self.cfg, self.state, self.send = cfg, state, send  # send(identity, header, *frames)
        self.bf16_view: torch.Tensor | None = None  # bf16(weights) as rollout workers hold it

    def reset(self) -> None:
        """The weights were (re)initialised or restored: rebuild the bf16 view from them."""
        w = self.state.weights
        self.bf16_view = w.to(torch.bfloat16) if self.cfg.rollout_bf16 and w is not None else None

    def publish(self, applied: SparseDelta, peers) -> None:
        """Send this version's change to every in-sync rollout peer (and keep the view current)."""
        st = self.state
        if not peers:
            if self.bf16_view is not None:  # keep the view current for rollout workers that join later
                self.bf16_view[applied.indices] = st.weights[applied.indices].to(torch.bfloat16)
            return
        if self.cfg.rollout_bf16:
            # Only entries touched by this aggregate can change; send those whose bf16 bits changed.
            idx = applied.indices
            new = st.weights[idx].to(torch.bfloat16)
            changed = new.view(torch.int16) != self.bf16_view[idx].view(torch.int16)
            self.bf16_view[idx] = new
            d = SparseDelta(idx[changed], new[changed], (st.numel,), torch.bfloat16)
            payload, kind = encode(d, "auto", "bf16"), "bf16_values"
        else:
            payload, kind = encode(applied, "auto", self.cfg.value_codec), "delta"
        header = pack("rollout", version=st.version, hash=st.hash, kind=kind)
        anchor = self.cfg.anchor_every and st.version % self.cfg.anchor_every == 0
        for p in peers:
            self.send(p.identity, header, payload)
            if anchor:
                self.send_anchor(p.identity)
            p.version = st.version

    def send_anchor(self, identity: bytes) -> None:
        src = self.bf16_view if self.cfg.rollout_bf16 else self.state.weights
        send_tensor(self.send, identity, "anchor", self.state, src,
                    dtype="bfloat16" if src.dtype == torch.bfloat16 else "float32")


def send_tensor(send, identity: bytes, op: str, state: State, tensor: torch.Tensor, **fields) -> None:
    """A whole tensor to one peer in chunks (chunks.py), each header stamped with the current version."""
    for where, chunk in chunks.split(chunks.raw_bytes(tensor)):
        send(identity, pack(op, version=state.version, hash=state.hash, **where, **fields), chunk)
