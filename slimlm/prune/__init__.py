"""Pruning: sparsity patterns and masks, magnitude, Wanda, SparseGPT, gradual magnitude.

Algorithms are pure tensor functions (``magnitude_mask``, ``wanda_mask``,
``sparsegpt_prune``); the configs and handlers that apply them to a model
are in :mod:`slimlm.prune.handlers` and :mod:`slimlm.prune.gradual`.
Pruned linears become :class:`slimlm.nn.SparseLinear` modules whose
checkpoints store only the kept weights and their positions.
Structured pruning (heads, neurons, layers -> a smaller dense model): configs in
:mod:`slimlm.prune.structured_config`, handlers in :mod:`slimlm.prune.structured_handler`
(its docstring lists the other pieces).
"""

from slimlm.prune.gradual import GradualMagnitude, apply_gradual_magnitude, cubic_sparsity
from slimlm.prune.handlers import Magnitude, SparseGPT, Wanda, apply_magnitude, apply_sparsegpt, apply_wanda
from slimlm.prune.magnitude import magnitude_mask
from slimlm.prune.masks import keep_mask, nm_keep, topk_keep_global, topk_keep_per_layer, topk_keep_per_row
from slimlm.prune.patterns import NM, Pattern, Unstructured, parse_pattern
from slimlm.prune.sparsegpt import SparseResult, sparsegpt_prune
from slimlm.prune.structured_config import PruneDepth, PruneWidth, Structured
from slimlm.prune.structured_handler import apply_prune_depth, apply_prune_width, apply_structured
from slimlm.prune.wanda import wanda_mask, wanda_scores

__all__ = [
    "NM", "GradualMagnitude", "Magnitude", "Pattern", "SparseGPT", "SparseResult", "Unstructured", "Wanda",
    "apply_gradual_magnitude", "apply_magnitude", "apply_sparsegpt", "apply_wanda", "cubic_sparsity", "keep_mask", "magnitude_mask", "nm_keep",
    "parse_pattern", "sparsegpt_prune", "topk_keep_global", "topk_keep_per_layer", "topk_keep_per_row",
    "wanda_mask", "wanda_scores",
    "PruneDepth", "PruneWidth", "Structured", "apply_prune_depth", "apply_prune_width", "apply_structured",
]  # fmt: skip
