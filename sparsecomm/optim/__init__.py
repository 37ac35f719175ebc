"""Optimizers: ASPG (Adam-style, sparse, error-compensated, communication inside step())."""
from .aspg import ASPG

__all__ = ["ASPG"]
