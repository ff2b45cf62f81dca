"""The distillation objective: what one training step of :class:`~slimlm.distill.Distill` minimises.

    loss = (1 - ce_weight) * KD(student logits, teacher logits)
           + ce_weight * CE(student logits, next tokens)
           + hidden_weight * H(student hidden states, teacher hidden states)

with KD the forward KL at temperature T (or the reverse KL; against the
teacher's top-k logits when asked), CE next-token cross-entropy, and H the
hidden-state loss over the layer map. ``loss: ce`` keeps only CE (plain
fine-tuning) plus H. The teacher runs under no_grad on the same ids, on the
fly: nothing is cached, so memory holds one batch of teacher logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from slimlm.distill.config import Distill
from slimlm.distill.hidden import hidden_loss
from slimlm.distill.logit import forward_kl
from slimlm.distill.reverse import reverse_kl
from slimlm.distill.topk import top_k_logits
from slimlm.train import Objective, next_token_loss

__all__ = ["distill_objective", "kd_loss"]


def kd_loss(logits: Tensor, teacher_logits: Tensor, config: Distill) -> Tensor:
    """The logit term of ``config``: forward or reverse KL at its temperature, on top-k logits if asked."""
    if config.loss == "reverse_kl":
        return reverse_kl(logits, teacher_logits, temperature=config.temperature)
    target = teacher_logits if config.top_k is None else top_k_logits(teacher_logits, config.top_k)
    return forward_kl(logits, target, temperature=config.temperature)


def distill_objective(teacher: nn.Module | None, config: Distill, *, pairs: Sequence[tuple[int, int]] = (),
                      projection: nn.Module | None = None) -> Objective:  # fmt: skip
    """``(model, ids (B, T)) -> scalar`` for :func:`slimlm.train.train` (``teacher`` None: ``loss: ce`` only)."""
    hidden = config.hidden_weight > 0

    def objective(model: nn.Module, ids: Tensor) -> Tensor:
        out = model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        ce = next_token_loss(out.logits, ids)
        if teacher is None:
            return ce
        with torch.no_grad():
            ref = teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        if config.loss == "ce":
            loss = ce
        else:
            kd = kd_loss(out.logits, ref.logits, config)
            loss = kd if config.ce_weight == 0 else (1 - config.ce_weight) * kd + config.ce_weight * ce
        if hidden:
            loss = loss + config.hidden_weight * hidden_loss(out.hidden_states, ref.hidden_states, pairs,
                                                             kind=config.hidden_loss, projection=projection)
        return loss

    return objective
