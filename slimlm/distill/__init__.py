"""Distillation: a teacher trains a compressed student (:class:`Distill`, a recipe step), and its losses.

One loss per file, plain tensor functions: ``logit.py`` (forward KL with
temperature, Hinton), ``reverse.py`` (reverse KL), ``topk.py`` (top-k
teacher logits), ``hidden.py`` (hidden-state loss over a layer map),
``sequence.py`` (the teacher's text for sequence-level KD). ``config.py``
(the Distill config), ``objective.py`` (what a training step minimises) and
``handler.py`` (what trains, what stays fixed) make the method;
:mod:`slimlm.distill.teacher` holds the frozen teacher of QAT and gradual
pruning's self-distillation.
"""

from slimlm.distill.config import DATA, LOSSES, Distill
from slimlm.distill.hidden import HIDDEN_KINDS, HiddenProjection, check_layer_map, hidden_loss, layer_map
from slimlm.distill.logit import forward_kl
from slimlm.distill.reverse import reverse_kl
from slimlm.distill.sequence import teacher_sequences
from slimlm.distill.teacher import LogitLoss, frozen_copy, recovery_objective, teacher_objective
from slimlm.distill.topk import TopKLogits, top_k_logits

__all__ = ["DATA", "HIDDEN_KINDS", "LOSSES", "Distill", "HiddenProjection", "LogitLoss", "TopKLogits",
           "check_layer_map", "forward_kl", "frozen_copy", "hidden_loss", "layer_map", "recovery_objective",
           "reverse_kl", "teacher_objective", "teacher_sequences", "top_k_logits"]
