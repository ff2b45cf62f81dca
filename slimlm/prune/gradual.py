"""Gradual magnitude pruning: prune a little, train, prune a little more.

Zhu & Gupta. "To prune, or not to prune: exploring the efficacy of pruning
for model compression", ICLR 2018 workshop (arXiv:1710.01878). Starting at
sparsity ``s_i``, every ``Δt`` training steps the smallest-magnitude weights
of each target matrix are pruned up to

    s_k = s_f + (s_i - s_f) * (1 - k / n)^3,    k = 0, 1, ..., n

so most weights go early, while the network is still redundant, and few at
the end; pruned weights stay zero (the masks are re-applied after every
optimizer step) and the survivors keep training in between, recovering what
each event cost. After the last event (at ``prune_end * steps``) training
goes on at the final sparsity. The training loop is QAT's
(:func:`slimlm.quant.qat.train_qat`: AdamW on the target linears, random
windows of the calibration ids, next-token loss or, by default, KL to the
dense model's predictions), with the pruning as its per-step hook.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.prune.handlers import prune_plan, swap_sparse
from slimlm.prune.magnitude import magnitude_mask
from slimlm.prune.masks import SCOPES
from slimlm.prune.patterns import Unstructured, check_sparsity
from slimlm.quant.qat import SCHEDULES, _positive, train_qat
from slimlm.targets import Targets

log = logging.getLogger("slimlm.prune")


def cubic_sparsity(k: int, n: int, *, final: float, initial: float = 0.0) -> float:
    """Sparsity after pruning event ``k`` of ``n`` (Zhu & Gupta's cubic schedule; ``k = n`` gives ``final``)."""
    progress = min(max(k, 0), n) / max(n, 1)
    return final + (initial - final) * (1.0 - progress) ** 3


@dataclass(frozen=True)
class GradualMagnitude:
    """Prune to ``sparsity`` over ``steps`` training steps on the calibration ids.

    Every ``prune_every`` steps the smallest ``|W|`` (per layer or per row,
    ``scope``) are pruned up to the cubic schedule from ``initial_sparsity``;
    the final sparsity is reached at ``prune_end * steps`` (then the rest of
    the steps recover). Training fields as in QAT: AdamW ``lr`` (``schedule``,
    ``warmup``), ``batch_size`` windows of ``seq_len`` tokens, ``distill``
    (KL to the dense model) or next-token cross-entropy.
    """

    needs_calibration: ClassVar[bool] = True

    sparsity: float = 0.5
    steps: int = 100
    prune_every: int = 10
    prune_end: float = 0.75
    initial_sparsity: float = 0.0
    scope: str = "layer"
    lr: float = 5e-5
    seq_len: int = 256
    batch_size: int = 4
    distill: bool = True
    schedule: str = "constant"
    warmup: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    targets: Targets = field(default_factory=Targets)

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        check_sparsity(self.initial_sparsity, name="initial_sparsity")
        if self.initial_sparsity > self.sparsity:
            raise SlimlmError(f"initial_sparsity {self.initial_sparsity} exceeds the final sparsity {self.sparsity}")
        for name, hint in (("steps", "e.g. 100"), ("prune_every", "steps between pruning events, e.g. 10"),
                           ("seq_len", "e.g. 256"), ("batch_size", "e.g. 4")):  # fmt: skip
            _positive(name, getattr(self, name), int, hint)
        if isinstance(self.prune_end, bool) or not isinstance(self.prune_end, (int, float)) \
                or not 0.0 < self.prune_end <= 1.0:  # fmt: skip
            raise SlimlmError(f"prune_end must be in (0, 1] (the fraction of steps by which the final sparsity "
                              f"is reached, e.g. 0.75), got {self.prune_end!r}")  # fmt: skip
        _positive("warmup", self.warmup, int, "steps of linear warm-up", zero_ok=True)
        _positive("lr", self.lr, float, "e.g. 5e-5")
        _positive("weight_decay", self.weight_decay, float, "e.g. 0.0", zero_ok=True)
        _positive("grad_clip", self.grad_clip, float, "max gradient norm, e.g. 1.0")
        if self.scope not in SCOPES:
            raise SlimlmError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if not isinstance(self.distill, bool):
            raise SlimlmError(f"distill must be true or false, got {self.distill!r}")
        if self.schedule not in SCHEDULES:
            raise SlimlmError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SlimlmError(f"seed must be an int, got {self.seed!r}")
        if not isinstance(self.targets, Targets):
            raise SlimlmError(f"targets must be a Targets(...), got {self.targets!r}")

    @property
    def events(self) -> int:
        """Pruning events after the initial one: the final sparsity comes at step ``events * prune_every``."""
        return max(1, int(self.prune_end * self.steps) // self.prune_every)


class _Masks:
    """The target weights' keep-masks, tightened at each pruning event and re-applied after each step."""

    def __init__(self, weights: dict[str, Tensor], config: GradualMagnitude) -> None:
        self.weights, self.config = weights, config
        self.keep = {n: torch.ones_like(W, dtype=torch.bool) for n, W in weights.items()}
        self.event = -1

    def prune_to(self, event: int) -> None:
        c = self.config
        s = cubic_sparsity(event, c.events, final=c.sparsity, initial=c.initial_sparsity)
        for name, W in self.weights.items():
            self.keep[name] = magnitude_mask(W * self.keep[name], s, Unstructured(), scope=c.scope)
            W.mul_(self.keep[name])
        self.event = event
        log.debug("gradual magnitude: event %d/%d, sparsity %.3f", event, c.events, s)

    def after_step(self, step: int) -> None:
        if (step + 1) % self.config.prune_every == 0 and self.event < self.config.events:
            self.prune_to(self.event + 1)
        else:
            for name, W in self.weights.items():
                W.mul_(self.keep[name])


def apply_gradual_magnitude(model: nn.Module, config: GradualMagnitude, calib: Tensor | None = None) -> nn.Module:
    """Train ``model`` on ``calib`` (N, L) ids while pruning its target linears, then swap in SparseLinears."""
    if calib is None:
        raise SlimlmError("gradual magnitude pruning trains on calibration token ids: pass calib=calibration_ids(...) "
                          "(or run it from a recipe, which provides them)")  # fmt: skip
    plan = prune_plan(model, config.targets, Unstructured())
    if any(not isinstance(m, nn.Linear) for m in plan.values()):
        raise SlimlmError("gradual magnitude pruning trains nn.Linear weights; GPT-2's Conv1D layers are not supported")
    teacher = None
    if config.distill:
        teacher = copy.deepcopy(model).eval()  # the dense model
        for p in teacher.parameters():
            p.requires_grad_(False)
    masks = _Masks({name: m.weight.data for name, m in plan.items()}, config)
    masks.prune_to(0)
    params = [p for m in plan.values() for p in m.parameters()]
    report = train_qat(model, params, calib, config, teacher=teacher, on_step=masks.after_step, desc="gradual")
    del teacher
    if masks.event < config.events:  # a schedule longer than the run: finish it
        masks.prune_to(config.events)
    k = max(1, min(10, len(report.losses) // 4))
    log.info("gradual magnitude to %.0f%%: %d steps, %d events, %.1f s; loss %.4f -> %.4f (mean of first/last %d)",
             100 * config.sparsity, len(report.losses), config.events, report.seconds,
             sum(report.losses[:k]) / k, sum(report.losses[-k:]) / k, k)  # fmt: skip
    with torch.no_grad():
        for name, module in plan.items():
            swap_sparse(model, name, module, masks.keep[name], Unstructured())
    return model
