"""Training: the one loop (:func:`train`) and the fields every training method shares (:class:`TrainConfig`).

QAT (:mod:`slimlm.quant.qat`) and gradual magnitude pruning
(:mod:`slimlm.prune.gradual`) train through it; their configs subclass
TrainConfig. Distillation objectives live in :mod:`slimlm.distill`.
"""

from slimlm.train.config import SCHEDULES, TrainConfig, check_number
from slimlm.train.losses import next_token_loss, next_token_objective
from slimlm.train.run import TrainRun
from slimlm.train.loop import Objective, TrainReport, lr_at, sample_batch, train

__all__ = ["SCHEDULES", "Objective", "TrainConfig", "TrainReport", "TrainRun", "check_number", "lr_at", "next_token_loss",
           "next_token_objective", "sample_batch", "train"]  # fmt: skip
