"""Training: the one loop (:func:`train`) and the fields every training method shares (:class:`TrainConfig`).

QAT (:mod:`slimlm.quant.qat`) and gradual magnitude pruning
(:mod:`slimlm.prune.gradual`) train through it; their configs subclass
TrainConfig. Distillation objectives live in :mod:`slimlm.distill`. The
loop's precision choice is :mod:`slimlm.train.precision`, its resumable run
state :mod:`slimlm.train.state`.
"""

from slimlm.train.config import SCHEDULES, TrainConfig, check_number
from slimlm.train.losses import next_token_loss, next_token_objective
from slimlm.train.run import TrainRun
from slimlm.train.loop import Objective, TrainReport, lr_at, sample_batch, train
from slimlm.train.precision import PRECISIONS, PrecisionChoice, choose_precision
from slimlm.train.state import STATE_FILE

__all__ = ["PRECISIONS", "SCHEDULES", "STATE_FILE", "Objective", "PrecisionChoice", "TrainConfig", "TrainReport",
           "TrainRun", "check_number", "choose_precision", "lr_at", "next_token_loss", "next_token_objective", "sample_batch",
           "train"]  # fmt: skip
