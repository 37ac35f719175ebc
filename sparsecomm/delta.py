"""SparseDelta: the value that travels between workers.

A sparse delta is k (index, value) pairs over a dense tensor of a known shape and dtype, plus
the metadata the exchange layer needs (the optimizer step that produced it and the weights
version it was computed against). Indices are flat positions into the row-major tensor.

Canonical form (what `SparseDelta` guarantees after `validate()` and what every selector and
decoder returns): indices are int64, strictly increasing (so unique), all in [0, numel);
values are a 1-D tensor of the same length, in `dtype`. Sorted indices make gap coding
possible and make `apply` deterministic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

# The dense dtypes a delta may target; names are the wire names used by the codec.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass
class SparseDelta:
    """k entries of a dense tensor of `shape`; everything else is zero."""

    indices: torch.Tensor  # (k,) int64, strictly increasing flat positions
    values: torch.Tensor  # (k,) in `dtype`
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    step: int = 0  # optimizer step that produced this delta
    base_version: int = 0  # weights version the delta was computed against
    meta: dict = field(default_factory=dict)  # free-form, never sent by the codec

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def k(self) -> int:
        return int(self.indices.numel())

    @property
    def density(self) -> float:
        """k / numel, a fraction in [0, 1] (0 for an empty tensor)."""
        n = self.numel
        return self.k / n if n else 0.0

    @classmethod
    def empty(cls, shape, dtype=torch.float32, **meta) -> "SparseDelta":
        return cls(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=dtype), tuple(shape), dtype, **meta)

    def validate(self) -> "SparseDelta":
        """Raise ValueError unless the delta is in canonical form; return self."""
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {self.dtype}; expected one of {list(DTYPES)}")
        if any((not isinstance(d, int)) or d < 0 for d in self.shape):
            raise ValueError(f"shape must be non-negative ints, got {self.shape}")
        if self.indices.dim() != 1 or self.values.dim() != 1:
            raise ValueError("indices and values must be 1-D")
        if self.indices.dtype != torch.int64:
            raise ValueError(f"indices must be int64, got {self.indices.dtype}")
        if self.indices.numel() != self.values.numel():
            raise ValueError(f"{self.indices.numel()} indices but {self.values.numel()} values")
        if self.values.dtype != self.dtype:
            raise ValueError(f"values are {self.values.dtype} but the delta is {self.dtype}")
        if self.k:
            if int(self.indices[0]) < 0 or int(self.indices[-1]) >= self.numel:
                raise ValueError(f"indices out of range [0, {self.numel})")
            if self.k > 1 and not bool((self.indices[1:] > self.indices[:-1]).all()):
                raise ValueError("indices must be strictly increasing")
        return self

    def to_dense(self) -> torch.Tensor:
        out = torch.zeros(self.numel, dtype=self.dtype, device=self.values.device)
        out[self.indices] = self.values
        return out.view(self.shape)

    def add_to(self, dense: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """dense += alpha * delta, in place (indices are unique, so this is a plain scatter-add)."""
        if tuple(dense.shape) != self.shape:
            raise ValueError(f"delta shape {self.shape} does not match tensor shape {tuple(dense.shape)}")
        vals = self.values.to(dense.dtype)
        if alpha != 1.0:
            vals = vals * alpha
        dense.view(-1).index_add_(0, self.indices.to(dense.device), vals.to(dense.device))
        return dense

    def with_values(self, values: torch.Tensor) -> "SparseDelta":
        return replace(self, values=values)
