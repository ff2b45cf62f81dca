"""TrainRun: the runtime facts of one training step of a recipe, beside its config.

A config says *what* to train (steps, lr, loss); a :class:`TrainRun` says
what this run trains against and where it keeps its state: the teacher (the
model as it was before the recipe's first step), the directory a resumable
run checkpoints into, the facts that identify the run (a state directory
written by another recipe or model is refused), and the reports the step
appends for the caller's JSON. :func:`slimlm.api.apply_all` makes one per
training step; from Python, ``apply(model, Distill(...), calib, teacher=base)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["TrainRun"]


@dataclass
class TrainRun:
    teacher: nn.Module | None = None  # frozen; None: the method uses its own default
    state_dir: Path | None = None  # resumable checkpoints (train-state.pt) go here; None: not resumable
    fingerprint: dict[str, Any] | None = None  # JSON-able facts a resumed state must match
    tokenizer: Any = None  # the student's, to check a teacher loaded from a source against
    reports: list[dict[str, Any]] = field(default_factory=list)  # TrainReport.to_json() of each run, appended

    def train_kwargs(self) -> dict[str, Any]:
        """What :func:`slimlm.train.train` takes from the run."""
        return dict(state_dir=self.state_dir, fingerprint=self.fingerprint)
