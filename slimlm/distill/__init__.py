"""Distillation: losses that pull a student's outputs towards a teacher's, and the teacher objective.

One loss per file (``logit.py``: forward KL of next-token distributions);
:mod:`slimlm.distill.teacher` wraps a loss of (student, teacher) logits into
an objective of (model, ids) for :func:`slimlm.train.train`.
"""

from slimlm.distill.logit import forward_kl
from slimlm.distill.teacher import LogitLoss, frozen_copy, recovery_objective, teacher_objective

__all__ = ["LogitLoss", "forward_kl", "frozen_copy", "recovery_objective", "teacher_objective"]
