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
goes on at the final sparsity. The training is the one loop,
:func:`slimlm.train.train` (AdamW on the target linears, random windows of
the calibration ids, next-token loss or, by default, KL to the dense
model's predictions), with the pruning as its per-step hook.
"""

from __future__ import annotations

import logging
from dataclasses import KW_ONLY, dataclass, field

import torch
from torch import Tensor, nn

from slimlm.distill import recovery_objective
from slimlm.errors import SlimlmError
from slimlm.prune.handlers import prune_plan, swap_sparse
from slimlm.prune.magnitude import magnitude_mask
from slimlm.prune.masks import SCOPES
from slimlm.prune.patterns import Unstructured, check_sparsity
from slimlm.targets import Targets, check_targets
from slimlm.train import TrainConfig, TrainRun, check_number, train
from slimlm.validate import check_bool, check_calib

log = logging.getLogger("slimlm.prune")


def cubic_sparsity(k: int, n: int, *, final: float, initial: float = 0.0) -> float:
    """Sparsity after pruning event ``k`` of ``n`` (Zhu & Gupta's cubic schedule; ``k = n`` gives ``final``)."""
    progress = min(max(k, 0), n) / max(n, 1)
    return final + (initial - final) * (1.0 - progress) ** 3


@dataclass(frozen=True)
class GradualMagnitude(TrainConfig):
    """Prune to ``sparsity`` over ``steps`` training steps on the calibration ids.

    Every ``prune_every`` steps the smallest ``|W|`` (per layer or per row,
    ``scope``) are pruned up to the cubic schedule from ``initial_sparsity``;
    the final sparsity is reached at ``prune_end * steps`` (then the rest of
    the steps recover). The training fields are
    :class:`~slimlm.train.TrainConfig`'s, with fewer steps, a smaller ``lr``
    and a constant schedule by default.
    """

    sparsity: float = 0.5
    prune_every: int = 10
    prune_end: float = 0.75
    initial_sparsity: float = 0.0
    scope: str = "layer"
    targets: Targets = field(default_factory=Targets)
    distill: bool = True  # KL to the model as it was before this step, else next-token cross-entropy
    _: KW_ONLY  # TrainConfig's fields with this method's defaults
    steps: int = 100
    lr: float = 5e-5
    schedule: str = "constant"

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        check_sparsity(self.initial_sparsity, name="initial_sparsity")
        if self.initial_sparsity > self.sparsity:
            raise SlimlmError(f"initial_sparsity {self.initial_sparsity} exceeds the final sparsity {self.sparsity}")
        check_number("prune_every", self.prune_every, "steps between pruning events, e.g. 10", integer=True)
        if isinstance(self.prune_end, bool) or not isinstance(self.prune_end, (int, float)) \
                or not 0.0 < self.prune_end <= 1.0:  # fmt: skip
            raise SlimlmError(f"prune_end must be in (0, 1] (the fraction of steps by which the final sparsity "
                              f"is reached, e.g. 0.75), got {self.prune_end!r}")  # fmt: skip
        if self.scope not in SCOPES:
            raise SlimlmError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        super().__post_init__()
        check_bool("distill", self.distill)
        check_targets(self.targets)

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

    def state_dict(self) -> dict:
        """What a resumed run needs besides the weights (saved in the train state)."""
        return {"keep": {n: k.clone() for n, k in self.keep.items()}, "event": self.event}

    def load_state_dict(self, state: dict) -> None:
        self.keep = {n: state["keep"][n].clone() for n in self.keep}
        self.event = state["event"]

    def __call__(self, step: int) -> None:
        """The training loop's ``on_step``: tighten at a pruning event, else re-apply the masks."""
        if (step + 1) % self.config.prune_every == 0 and self.event < self.config.events:
            self.prune_to(self.event + 1)
        else:
            for name, W in self.weights.items():
                W.mul_(self.keep[name])


def apply_gradual_magnitude(model: nn.Module, config: GradualMagnitude, calib: Tensor | None = None, *,
                            run: TrainRun | None = None) -> nn.Module:  # fmt: skip
    """Train ``model`` on ``calib`` (N, L) ids while pruning its target linears, then swap in SparseLinears."""
    if calib is None:
        raise SlimlmError("gradual magnitude pruning trains on calibration token ids: pass calib=calibration_ids(...) "
                          "(or run it from a recipe, which provides them)")  # fmt: skip
    check_calib(calib, "gradual magnitude pruning")
    plan = prune_plan(model, config.targets, Unstructured())
    if any(not isinstance(m, nn.Linear) for m in plan.values()):
        raise SlimlmError("gradual magnitude pruning trains nn.Linear weights; GPT-2's Conv1D layers are not supported")
    objective = recovery_objective(model, distill=config.distill)  # the dense model, before any pruning
    masks = _Masks({name: m.weight.data for name, m in plan.items()}, config)
    masks.prune_to(0)
    params = [p for m in plan.values() for p in m.parameters()]
    report = train(model, params, objective, calib, config, on_step=masks,
                   desc=f"gradual magnitude to {100 * config.sparsity:.0f}%",
                   **(run.train_kwargs() if run else {}))  # fmt: skip
    if run is not None:
        run.reports.append({"method": "gradual_magnitude", **report.to_json()})
    del objective  # the teacher copy, if any
    if masks.event < config.events:  # a schedule longer than the run: finish it
        masks.prune_to(config.events)
    log.info("gradual magnitude: %d pruning events to %.0f%%", config.events, 100 * config.sparsity)
    with torch.no_grad():
        for name, module in plan.items():
            swap_sparse(model, name, module, masks.keep[name], Unstructured())
    return model
