"""The one training loop: AdamW on chosen parameters, random windows of the calibration ids.

Every method that trains runs through :func:`train`: QAT trains latent weights
through the quantizer, gradual magnitude pruning trains the survivors between
pruning events (its ``on_step`` hook re-applies the masks). What is minimised
is the caller's ``objective(model, ids)``: next-token cross-entropy
(:func:`slimlm.train.losses.next_token_objective`) or a distillation loss to a
frozen teacher (:mod:`slimlm.distill`).

One step: set the scheduled learning rate, draw ``(B, T)`` windows with the
run's own generator (seeded by ``config.seed``, so the windows do not depend
on the global RNG), forward and backward, clip the gradient norm, step,
then ``on_step``. The optimizer and the generator are the whole run state
besides the weights (what a resumable checkpoint would save).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from slimlm.errors import SlimlmError
from slimlm.train.config import TrainConfig
from slimlm.validate import check_calib

log = logging.getLogger("slimlm.train")

Objective = Callable[[nn.Module, Tensor], Tensor]  # (model, ids (B, T)) -> scalar loss

__all__ = ["Objective", "TrainReport", "lr_at", "sample_batch", "train"]


@dataclass(frozen=True)
class TrainReport:
    losses: list[float]  # training loss per step
    seconds: float  # training time
    tokens: int  # tokens seen (steps x batch x seq_len)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(len(self.losses), 1)

    def loss_trend(self) -> tuple[float, float, int]:
        """Mean loss of the first and of the last ``k`` steps, and ``k`` (a quarter of the run, 1 to 10)."""
        k = max(1, min(10, len(self.losses) // 4))
        return sum(self.losses[:k]) / k, sum(self.losses[-k:]) / k, k


def sample_batch(calib: Tensor, *, seq_len: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """``(B, T)`` random windows of the calibration ids ``(N, L)``, ``T = min(seq_len, L)``."""
    N, L = calib.shape
    T = min(seq_len, L)
    rows = torch.randint(N, (batch_size,), generator=generator)
    starts = torch.randint(L - T + 1, (batch_size,), generator=generator)
    return torch.stack([calib[r, s : s + T] for r, s in zip(rows.tolist(), starts.tolist())])  # (B, T)


def lr_at(step: int, *, steps: int, lr: float, schedule: str, warmup: int) -> float:
    """Learning rate of ``step`` (0-based): linear warm-up, then cosine to 0 or constant."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(steps - warmup, 1)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@contextmanager
def _training(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Only ``params`` need grad, the model in train mode; afterwards the flags as they were, eval mode."""
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        model.train()
        with torch.enable_grad():  # apply() runs handlers under no_grad
            yield
    finally:
        model.eval()
        for p, flag in frozen.items():
            p.requires_grad_(flag)


def train(model: nn.Module, params: Sequence[nn.Parameter], objective: Objective, calib: Tensor, config: TrainConfig,
          *, on_step: Callable[[int], None] | None = None, desc: str = "train") -> TrainReport:  # fmt: skip
    """Minimise ``objective(model, ids)`` over ``params`` only, on windows of ``calib`` (N, L) ids.

    Everything else stays frozen for the run; the model ends in eval mode with
    its ``requires_grad`` flags restored. ``on_step(step)`` runs under no_grad
    after each optimizer step (gradual pruning re-applies its masks there).
    """
    check_calib(calib, desc)
    params = list(params)
    if not params:
        raise SlimlmError(f"{desc}: no parameters to train (the targets matched no module)")
    device = params[0].device
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    losses, t0 = [], time.perf_counter()
    bar = tqdm(range(config.steps), desc=desc, unit="step", leave=False)
    with _training(model, params):
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps=config.steps, lr=config.lr, schedule=config.schedule,
                                    warmup=config.warmup)  # fmt: skip
            ids = sample_batch(calib, seq_len=config.seq_len, batch_size=config.batch_size, generator=gen)
            loss = objective(model, ids.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            if on_step is not None:
                with torch.no_grad():
                    on_step(step)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    tokens = config.steps * config.batch_size * min(config.seq_len, calib.shape[1])
    report = TrainReport(losses, time.perf_counter() - t0, tokens)
    first, last, k = report.loss_trend()
    log.info("%s: %d steps, %d tokens, %.1f s (%.2f s/step); loss %.4f -> %.4f (mean of first/last %d)",
             desc, len(losses), tokens, report.seconds, report.seconds_per_step, first, last, k)  # fmt: skip
    return report
