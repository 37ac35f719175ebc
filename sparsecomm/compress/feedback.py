"""Error feedback: nothing the selector drops is lost, it is sent later.

    e = ef.compensate(name, u)      # residual += u; returns the live buffer e
                                    # (or e, u = ef.deferred(name, u); select(e, k, move_in=u):
                                    #  the addition fused into the selection pass)
    d = selector.select(e, k)       # what to send ...
    d = roundtrip_values(d, "bf16") # ... exactly as receivers will decode it
    ef.update(name, d)              # residual = e - d

Conservation is exact, bit for bit, at every step: after `update`, residual + dense(d) equals
the compensated buffer e. For lossless values the sent positions become exactly zero; for
lossy codecs (bf16, fp16, int8) the residual keeps e - q(e), which is computed exactly in
floating point because q(e) is within a factor of two of e (Sterbenz), so adding it back gives e.
(Across steps, `residual += u` itself rounds like any fp32 accumulation.)

The residual must wrap the quantity that is actually compressed: in ASPG that is the Adam-style
update, after normalisation, not the raw gradient (1-bit Adam's lesson).
"""
from __future__ import annotations

import torch

from ..delta import SparseDelta


def subtract_sent_(residual: torch.Tensor, sent: SparseDelta) -> None:
    """residual[i] -= value for every sent entry, in place. index_add_ with alpha=-1 gives exactly
    residual[i] - value (indices are unique, so it is a plain scatter) at ~2x the speed of an
    index_put; used by ErrorFeedback.update and by the exchange's commits."""
    flat = residual.view(-1)
    flat.index_add_(0, sent.indices.to(flat.device), sent.values.to(flat.device, flat.dtype), alpha=-1)


def add_stochastic_(dst: torch.Tensor, src: torch.Tensor, generator: torch.Generator) -> None:
    """dst (bf16) += src (fp32), rounded stochastically: the fp32 sum rounds up in magnitude with
    probability (its distance to the bf16 below) / (one bf16 step), so E[dst] is the exact sum (a bf16
    residual, ASPG's state_dtype="bf16": round-to-nearest would drop every addition below half an ulp).
    Done on the bits: add 16 random low bits to the fp32 pattern, then cut them (sign-magnitude: works
    for both signs; an exact sum stays exact; inf stays inf, nan stays nan)."""
    x = dst.float().add_(src)
    nan = torch.isnan(x)  # an all-ones nan mantissa would carry into the sign bit
    bits = x.view(torch.int32)
    bits.add_(torch.randint(0, 1 << 16, x.shape, generator=generator, dtype=torch.int32, device=x.device))
    bits.bitwise_and_(-65536)  # ~0xFFFF: the fp32 value is now exactly a bf16 value
    dst.copy_(x.masked_fill_(nan, float("nan")))


class ErrorFeedback:
    """Per-tensor residual buffers, keyed by name."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = dtype  # residuals accumulate many small updates: fp32 (bf16 only with stochastic rounding)
        self.residuals: dict[str, torch.Tensor] = {}

    def compensate(self, name: str, update: torch.Tensor) -> torch.Tensor:
        """residual += update; return the residual buffer itself (not a copy)."""
        r = self.residuals.get(name)
        if r is None:
            r = self.residuals[name] = update.detach().to(self.dtype).clone()
        elif r.shape != update.shape:
            raise ValueError(f"{name}: update shape {tuple(update.shape)} != residual shape {tuple(r.shape)}")
        else:
            r.add_(update.detach().to(self.dtype))
        return r

    def deferred(self, name: str, update: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`compensate` with the addition left to the caller's next pass over the residual (a
        selector's `move_in`, which adds and zeroes `update` chunk by chunk while it ranks): returns
        (residual, update), or (a new residual holding update, None) the first time."""
        r = self.residuals.get(name)
        if r is None or r.dtype != self.dtype or not r.is_contiguous():
            return self.compensate(name, update), None
        if r.shape != update.shape:
            raise ValueError(f"{name}: update shape {tuple(update.shape)} != residual shape {tuple(r.shape)}")
        return r, update

    def update(self, name: str, sent: SparseDelta) -> None:
        """Subtract what was sent (as the receivers decode it) from the residual."""
        r = self.residuals[name]
        if tuple(r.shape) != sent.shape:
            raise ValueError(f"{name}: sent shape {sent.shape} != residual shape {tuple(r.shape)}")
        subtract_sent_(r, sent)

    def residual(self, name: str) -> torch.Tensor:
        return self.residuals[name]

    def state_dict(self) -> dict:
        return {"dtype": str(self.dtype).removeprefix("torch."), "residuals": {k: v.clone() for k, v in self.residuals.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.dtype = getattr(torch, state["dtype"])
        self.residuals = {k: v.detach().to(self.dtype).clone() for k, v in state["residuals"].items()}
