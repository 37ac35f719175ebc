"""Emulated multi-host clusters on one machine (network namespaces; needs root)."""
from .netns import EmulatedCluster, can_create_namespaces

__all__ = ["EmulatedCluster", "can_create_namespaces"]
