"""Logit distillation: match the student's next-token distributions to a teacher's.

Hinton, Vinyals & Dean. "Distilling the Knowledge in a Neural Network",
2015 (arXiv:1503.02531). The student is trained on the teacher's soft
targets: the cross-entropy ``-sum_v p_t(v) log p_s(v)``, which differs from

    KL(p_t || p_s) = sum_v p_t(v) (log p_t(v) - log p_s(v))

only by the teacher's entropy, a constant for the student. We minimise the
KL itself (the *forward* KL: the student must cover every token the teacher
gives mass to), averaged over token positions. It is the objective of
LLM-QAT's data-free distillation (Liu et al. 2023, arXiv:2305.17888) and
what slimlm's QAT and gradual pruning minimise with ``distill: true``.

Temperature T: both distributions are ``softmax(z / T)``; the KL is
multiplied by T**2 because the gradient of the softened KL with respect to
the student logits scales as 1/T**2 (Hinton et al., section 2), so the loss
keeps a comparable magnitude as T changes. T = 1 is the plain KL.

Top-k teacher (:class:`~slimlm.distill.topk.TopKLogits`): the teacher
distribution is its top-k logits renormalised, ``p_t(k) = softmax_k(z_k / T)``,
and the student's log-probabilities are its full softmax read at those ids:

    sum_k p_t(k) (log p_t(k) - log p_s(idx_k))

(the student is not renormalised: its mass outside the top k is what it gives
to tokens the teacher left out, and the loss pushes it back onto the top k).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from slimlm.distill.topk import TopKLogits
from slimlm.errors import SlimlmError

__all__ = ["check_temperature", "forward_kl", "log_probs"]


def check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise SlimlmError(f"distillation temperature must be a number > 0 (1 = plain softmax), got {temperature!r}")


def log_probs(logits: Tensor, temperature: float) -> Tensor:
    """``log_softmax(logits / T)`` in float32 over the last dim, flattened to ``(B*T, V)``."""
    V = logits.shape[-1]
    return F.log_softmax(logits.float().reshape(-1, V) / temperature, dim=-1)  # (B*T, V); x / 1.0 == x exactly


def forward_kl(logits: Tensor, teacher_logits: Tensor | TopKLogits, *, temperature: float = 1.0) -> Tensor:
    """T**2 * mean per-token KL(p_t^T || p_s^T); ``logits`` (student) ``(B, T, V)``, teacher ``(B, T, V)`` or top-k."""
    check_temperature(temperature)
    log_p = log_probs(logits, temperature)  # (B*T, V) student
    if isinstance(teacher_logits, TopKLogits):
        return _top_k_kl(log_p, teacher_logits, temperature) * temperature**2
    log_q = log_probs(teacher_logits, temperature)  # (B*T, V) teacher
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * temperature**2  # sum V, mean B*T


def _top_k_kl(log_p: Tensor, teacher: TopKLogits, temperature: float) -> Tensor:
    """Mean over positions of sum_k p_t(k) (log p_t(k) - log p_s(idx_k)); ``log_p`` (B*T, V)."""
    k = teacher.k
    if teacher.values.shape[:2].numel() != log_p.shape[0]:
        raise SlimlmError(f"top-k teacher covers {tuple(teacher.values.shape[:2])} positions but the student "
                          f"logits have {log_p.shape[0]}; compute both on the same (B, T) ids")  # fmt: skip
    log_q = log_probs(teacher.values, temperature)  # (B*T, k) renormalised over the top k
    log_p_k = log_p.gather(-1, teacher.indices.reshape(-1, k))  # (B*T, k) student at the teacher's ids
    return (log_q.exp() * (log_q - log_p_k)).sum(-1).mean()
