"""Pruning: configs and their handlers."""

from slimlm.prune.structured_handler import (
    PruneDepth,
    PruneWidth,
    Structured,
    apply_prune_depth,
    apply_prune_width,
    apply_structured,
)

__all__ = ["PruneDepth", "PruneWidth", "Structured", "apply_prune_depth", "apply_prune_width", "apply_structured"]
