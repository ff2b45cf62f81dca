"""A frozen teacher and the training objective that distils it into the model being trained.

:func:`teacher_objective` turns a loss of (student logits, teacher logits),
such as :func:`~slimlm.distill.logit.forward_kl`, into an objective of
(model, ids) for :func:`slimlm.train.train`; the teacher runs under no_grad.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor, nn

from slimlm.distill.logit import forward_kl
from slimlm.train import Objective, next_token_objective

LogitLoss = Callable[[Tensor, Tensor], Tensor]  # (student logits, teacher logits), both (B, T, V) -> scalar

__all__ = ["LogitLoss", "frozen_copy", "recovery_objective", "teacher_objective"]


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with no parameter needing grad."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def teacher_objective(teacher: nn.Module, loss: LogitLoss = forward_kl) -> Objective:
    """``(model, ids) -> loss(model logits, teacher logits)`` on the same ``ids (B, T)``."""

    def objective(model: nn.Module, ids: Tensor) -> Tensor:
        logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
        with torch.no_grad():
            target = teacher(input_ids=ids, use_cache=False).logits  # (B, T, V)
        return loss(logits, target)

    return objective


def recovery_objective(model: nn.Module, *, distill: bool) -> Objective:
    """What a compression method trains to recover what it cost (its ``distill`` field).

    ``distill``: forward KL to a frozen copy of ``model`` as it is now, before
    the method changes it (self-distillation); else next-token cross-entropy.
    """
    return teacher_objective(frozen_copy(model)) if distill else next_token_objective
