"""The one training loop: AdamW on chosen parameters, random windows of the calibration ids.

Every method that trains runs through :func:`train`: QAT trains latent weights
through the quantizer, gradual magnitude pruning trains the survivors between
pruning events (its ``on_step`` hook re-applies the masks). What is minimised
is the caller's ``objective(model, ids)``: next-token cross-entropy
(:func:`slimlm.train.losses.next_token_objective`) or a distillation loss to a
frozen teacher (:mod:`slimlm.distill`).

One step: set the scheduled learning rate, draw ``(A*B, T)`` windows with
the run's own generator (seeded by ``config.seed``, so the windows do not
depend on the global RNG) in one call, run forward and backward on each of
the ``A = grad_accum`` micro-batches of ``B = batch_size`` windows with the
loss divided by ``A`` (the mean of equal-size means is the mean over all
``A*B`` windows, so the gradient is the full batch's), clip the gradient
norm, step, then ``on_step``. The forward and loss run in the run's
precision (:mod:`slimlm.train.precision`).

Given a ``state_dir``, the run state (:mod:`slimlm.train.state`) is saved
every ``checkpoint_every`` steps and after the last; a run started again
with the same fingerprint continues after the saved step and ends with the
same weights, bit for bit, as a run never interrupted.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from slimlm.errors import SlimlmError
from slimlm.train.config import TrainConfig
from slimlm.train.precision import autocast, choose_precision
from slimlm.train.state import capture_state, load_state, restore_state, run_fingerprint, save_state
from slimlm.validate import check_calib

log = logging.getLogger("slimlm.train")

Objective = Callable[[nn.Module, Tensor], Tensor]  # (model, ids (B, T)) -> scalar loss

__all__ = ["Objective", "TrainReport", "lr_at", "sample_batch", "train"]


@dataclass(frozen=True)
class TrainReport:
    losses: list[float]  # training loss per step, of the whole run (a resumed run includes the saved ones)
    seconds: float  # training time of the whole run, summed over resumptions
    tokens: int  # tokens seen (steps x batch x grad_accum x seq_len)
    resumed_from: int | None = None  # steps already done in a saved state, None for a fresh run
    precision: str = "fp32"  # the precision trained in: fp32 or bf16
    config: dict = field(default_factory=dict)  # TrainConfig.as_dict()

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(len(self.losses), 1)

    def loss_trend(self) -> tuple[float, float, int]:
        """Mean loss of the first and of the last ``k`` steps, and ``k`` (a quarter of the run, 1 to 10)."""
        k = max(1, min(10, len(self.losses) // 4))
        return sum(self.losses[:k]) / k, sum(self.losses[-k:]) / k, k

    def to_json(self) -> dict:
        """config, steps, tokens, seconds, precision, resumed_from and every loss (6 decimals)."""
        return {"config": self.config, "steps": len(self.losses), "tokens": self.tokens,
                "seconds": round(self.seconds, 3), "precision": self.precision, "resumed_from": self.resumed_from,
                "losses": [round(x, 6) for x in self.losses]}  # fmt: skip


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


def _step(model: nn.Module, params: list[nn.Parameter], objective: Objective, opt: torch.optim.Optimizer,
          ids: Tensor, *, config: TrainConfig, precision: str) -> float:  # fmt: skip
    """One optimizer step on ``ids (A*B, T)``: backward of each micro-batch's loss / A, clip, AdamW; the mean loss."""
    opt.zero_grad(set_to_none=True)
    total = torch.zeros((), device=ids.device)
    for micro in ids.split(config.batch_size):  # A x (B, T)
        with autocast(ids.device, precision):
            loss = objective(model, micro) / config.grad_accum
        loss.backward()
        total += loss.detach().float()
    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    opt.step()
    return total.item()


def _set_lr(opt: torch.optim.Optimizer, step: int, config: TrainConfig) -> float:
    lr = lr_at(step, steps=config.steps, lr=config.lr, schedule=config.schedule, warmup=config.warmup)
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def train(model: nn.Module, params: Sequence[nn.Parameter], objective: Objective, calib: Tensor, config: TrainConfig,
          *, on_step: Callable[[int], None] | None = None, desc: str = "train", state_dir: str | Path | None = None,
          fingerprint: dict | None = None) -> TrainReport:  # fmt: skip
    """Minimise ``objective(model, ids)`` over ``params`` only, on windows of ``calib`` (N, L) ids.

    Everything else stays frozen for the run; the model ends in eval mode with
    its ``requires_grad`` flags restored. ``on_step(step)`` runs under no_grad
    after each optimizer step (gradual pruning re-applies its masks there).
    Tensors follow ``params[0].device``. ``state_dir``: save the run state
    there and resume from it (see :mod:`slimlm.train.state`); ``fingerprint``:
    JSON-able facts naming the run (model, recipe, step), which a saved state
    must match besides the training fields of ``config``.
    """
    check_calib(calib, desc)
    params = list(params)
    if not params:
        raise SlimlmError(f"{desc}: no parameters to train (the targets matched no module)")
    device = params[0].device
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    facts = run_fingerprint(config, fingerprint)
    saved = load_state(state_dir, facts) if state_dir is not None else None
    if saved is not None:
        restore_state(saved, model, params, opt, gen, hook=on_step)
        log.info("%s: resuming after step %d of %d from %s", desc, saved["step"], config.steps, state_dir)
    start, losses, before = (0, [], 0.0) if saved is None else (saved["step"], saved["losses"], saved["seconds"])
    # a resumed run keeps the precision it started in
    precision = choose_precision(config.precision, params).precision if saved is None else saved["precision"]
    step_tokens = config.batch_size * config.grad_accum * min(config.seq_len, calib.shape[1])
    t0 = time.perf_counter()
    bar = tqdm(range(start, config.steps), desc=desc, unit="step", leave=False, initial=start, total=config.steps)
    with _training(model, params):
        for step in bar:
            lr = _set_lr(opt, step, config)
            # (A*B, T): all of a step's micro-batches in one draw
            ids = sample_batch(calib, seq_len=config.seq_len, batch_size=config.batch_size * config.grad_accum,
                               generator=gen)  # fmt: skip
            losses.append(_step(model, params, objective, opt, ids.to(device), config=config, precision=precision))
            if on_step is not None:
                with torch.no_grad():
                    on_step(step)
            elapsed = time.perf_counter() - t0
            rate = (step + 1 - start) * step_tokens / max(elapsed, 1e-9)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{rate:.0f}")
            if (step + 1) % config.log_every == 0:
                log.info("%s: step %d/%d, loss %.4f, lr %.3g, %.0f tokens/s", desc, step + 1, config.steps,
                         losses[-1], lr, rate)  # fmt: skip
            if state_dir is not None and ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps):
                state = capture_state(step + 1, model, params, opt, gen, losses=losses, seconds=before + elapsed,
                                      precision=precision, fingerprint=facts, hook=on_step)  # fmt: skip
                save_state(state_dir, state)
    report = TrainReport(losses, before + time.perf_counter() - t0, config.steps * step_tokens,
                         resumed_from=None if saved is None else start, precision=precision,
                         config=config.as_dict())  # fmt: skip
    first, last, k = report.loss_trend()
    log.info("%s: %d steps, %d tokens, %.1f s (%.2f s/step), %s; loss %.4f -> %.4f (mean of first/last %d)",
             desc, len(losses), report.tokens, report.seconds, report.seconds_per_step, precision, first, last,
             k)  # fmt: skip
    return report
