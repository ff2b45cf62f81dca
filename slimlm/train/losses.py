"""Next-token cross-entropy: the language-modelling objective, as a tensor function and on a model."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["next_token_loss", "next_token_objective"]


def next_token_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits (B, T, V)`` predicting ``ids[:, 1:]`` (the last position has no target)."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, V), ids[:, 1:].reshape(-1))  # over B*(T-1) tokens


def next_token_objective(model: nn.Module, ids: Tensor) -> Tensor:
    """:func:`next_token_loss` of ``model`` on ``ids (B, T)``: a :data:`slimlm.train.Objective`."""
    return next_token_loss(model(input_ids=ids, use_cache=False).logits, ids)
