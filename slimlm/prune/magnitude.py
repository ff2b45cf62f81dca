"""Magnitude pruning: drop the weights of smallest absolute value.

The classic baseline (Han, Pool, Tran, Dally. "Learning both Weights and
Connections for Efficient Neural Networks", NeurIPS 2015, arXiv:1506.02626),
here one shot, no retraining: score ``|W_ij|``, prune the lowest scores per
output row, per layer, or across all layers (:mod:`slimlm.prune.masks`); N:M
keeps the largest ``n`` of each ``m`` consecutive inputs of a row. The
gradual variant with training in between is :mod:`slimlm.prune.gradual`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.prune.masks import keep_mask
from slimlm.prune.patterns import Pattern


@torch.no_grad()
def magnitude_scores(W: Tensor) -> Tensor:
    """``|W|`` in float32, ``(out, in)``."""
    return W.detach().float().abs()


@torch.no_grad()
def magnitude_mask(W: Tensor, sparsity: float, pattern: Pattern, *, scope: str = "layer") -> Tensor:
    """Keep-mask ``(out, in)`` of ``W``: the largest ``|W|`` per layer or per row, or N:M."""
    return keep_mask(magnitude_scores(W), sparsity, pattern, scope=scope)
