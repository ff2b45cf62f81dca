"""Wanda: pruning by weights and activations, no weight update.

Sun, Liu, Bair, Kolter. "A Simple and Effective Pruning Approach for Large
Language Models", ICLR 2024 (arXiv:2306.11695).

For a linear ``y = W x`` with calibration inputs ``X (n, in)`` the score of
``W_ij`` is ``|W_ij| * ||X_j||_2``: the weight times the norm of the input
feature it multiplies. Scores are compared within each output row (the
paper's "per output" comparison group, which it found better than per layer
for LLMs); N:M keeps the ``n`` highest scores of each ``m`` consecutive
inputs of a row. The kept weights are not changed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.errors import SlimlmError
from slimlm.prune.masks import keep_mask
from slimlm.prune.patterns import Pattern


@torch.no_grad()
def wanda_scores(W: Tensor, x_sq_norm: Tensor) -> Tensor:
    """``|W_ij| * ||X_j||_2`` ``(out, in)`` from ``x_sq_norm (in,) = sum_rows X_j^2``."""
    if x_sq_norm.shape != (W.shape[1],):
        raise SlimlmError(f"x_sq_norm must be (in,) = ({W.shape[1]},), got {tuple(x_sq_norm.shape)}")
    return W.detach().float().abs() * x_sq_norm.float().clamp(min=0).sqrt().unsqueeze(0)  # (out, in)


@torch.no_grad()
def wanda_mask(W: Tensor, x_sq_norm: Tensor, sparsity: float, pattern: Pattern) -> Tensor:
    """Keep-mask ``(out, in)``: per row the highest ``|W| * ||x||`` (unstructured), or N:M."""
    return keep_mask(wanda_scores(W, x_sq_norm), sparsity, pattern, scope="row")
