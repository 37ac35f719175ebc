"""sparsecomm: communication-efficient distributed RL fine-tuning with sparse, error-compensated updates.

Import-light by design: only torch, numpy and msgpack are loaded here; trl, transformers and
deepspeed load only inside the integrations that need them.
"""
from .delta import SparseDelta

__version__ = "0.1.0"
__all__ = ["SparseDelta", "__version__"]
