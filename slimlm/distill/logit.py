"""Logit distillation: match the student's next-token distributions to a teacher's.

Hinton, Vinyals & Dean. "Distilling the Knowledge in a Neural Network",
2015 (arXiv:1503.02531). The student is trained on the teacher's soft
targets: the cross-entropy ``-sum_v p_t(v) log p_s(v)``, which differs from

    KL(p_t || p_s) = sum_v p_t(v) (log p_t(v) - log p_s(v))

only by the teacher's entropy, a constant for the student. We minimise the
KL itself (the *forward* KL: the student must cover every token the teacher
gives mass to), at temperature 1, averaged over token positions. It is the
objective of LLM-QAT's data-free distillation (Liu et al. 2023,
arXiv:2305.17888) and what slimlm's QAT and gradual pruning minimise with
``distill: true``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["forward_kl"]


def forward_kl(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean per-token KL(p_teacher || p_student); ``logits`` (student) and ``teacher_logits`` both ``(B, T, V)``."""
    V = logits.shape[-1]
    log_p = F.log_softmax(logits.float().reshape(-1, V), dim=-1)  # (B*T, V) student
    log_q = F.log_softmax(teacher_logits.float().reshape(-1, V), dim=-1)  # (B*T, V) teacher
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")  # sum over V, mean over B*T
