"""Reverse KL distillation: the student's distribution weights the divergence (mode-seeking).

    KL(p_s || p_t) = sum_v p_s(v) (log p_s(v) - log p_t(v))

Where the forward KL (:mod:`slimlm.distill.logit`) makes the student spread
mass over every token the teacher likes, the reverse KL lets it drop some of
the teacher's modes and punishes it for putting mass where the teacher has
little: a small student concentrates on what it can imitate well.

MiniLLM (Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language
Models", arXiv:2306.08543) optimises the *sequence-level* reverse KL over the
student's own samples by policy gradient. This is the token-level form, the
per-position reverse KL on given sequences, as used e.g. by GKD (Agarwal et
al. 2024, "On-Policy Distillation of Language Models", arXiv:2306.13649) as
one of its divergences. Temperature and the T**2 factor as in
:func:`~slimlm.distill.logit.forward_kl`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from slimlm.distill.logit import check_temperature, log_probs
from slimlm.distill.topk import TopKLogits
from slimlm.errors import SlimlmError

__all__ = ["reverse_kl"]


def reverse_kl(logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """T**2 * mean per-token KL(p_s^T || p_t^T); ``logits`` (student) and ``teacher_logits`` both ``(B, T, V)``."""
    if isinstance(teacher_logits, TopKLogits):
        # p_t outside the top k is unknown, and the reverse KL weights every token by p_s, so it needs log p_t
        # over the whole vocabulary.
        raise SlimlmError("reverse KL needs the teacher's full logits, not top-k ones; use loss kl (forward) "
                          "with top_k, or reverse KL without top_k")  # fmt: skip
    check_temperature(temperature)
    log_p = log_probs(logits, temperature)  # (B*T, V) student
    log_q = log_probs(teacher_logits, temperature)  # (B*T, V) teacher
    # kl_div(input, target) = sum target * (log target - input): the target is the student here
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature**2
