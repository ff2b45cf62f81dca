"""apply(model, config, calib): look the config's type up in the registry and run its handler.

The registry is :mod:`slimlm.methods`. A recipe is a plain loop over
configs. Handlers are short glue: pick target modules, gather statistics,
call the algorithm, swap the module. A method that trains (QAT, gradual
pruning, distillation) also gets a :class:`~slimlm.train.TrainRun`: the
teacher, and where a resumable run keeps its state.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimlm.distill.teacher import frozen_copy
from slimlm.errors import SlimlmError
from slimlm.methods import METHODS, method_for
from slimlm.train import TrainRun

log = logging.getLogger("slimlm")


def apply(model: nn.Module, config: Any, calib: torch.Tensor | None = None, *, teacher: nn.Module | None = None,
          run: TrainRun | None = None, original: nn.Module | None = None) -> nn.Module:  # fmt: skip
    """Apply one compression config to ``model`` in place and return it (the registry picks the handler).

    ``teacher`` (or a whole ``run``) is for methods that train: ``apply(student, Distill(), calib,
    teacher=base)`` distils ``base`` into ``student``. ``original`` is for methods that need the float
    model a quantization step started from: ``apply(qmodel, EoRA(rank=32), calib, original=base)``.
    """
    method = method_for(config)
    log.info("applying %s", config)
    if original is not None and not method.original:
        users = ", ".join(m.name for m in METHODS.values() if m.original)
        raise SlimlmError(f"{method.name} does not read the original model: original= is for {users}")
    if not method.trains:
        if teacher is not None or run is not None:
            trainers = ", ".join(m.name for m in METHODS.values() if m.trains)
            raise SlimlmError(f"{method.name} does not train: teacher= and run= are for the methods that do "
                              f"({trainers})")  # fmt: skip
        with torch.no_grad():
            if method.original:
                return method.apply(model, config, calib, original=original)
            return method.apply(model, config, calib)
    run = run if run is not None else TrainRun()
    if teacher is not None:
        run.teacher = teacher
    with torch.no_grad():
        return method.apply(model, config, calib, run=run)


def needs_calibration(configs: list[Any]) -> bool:
    """Whether any config's method gathers statistics from calibration text."""
    return any(method_for(c).needs_calibration(c) for c in configs)


def trains(configs: list[Any]) -> bool:
    """Whether any config's method trains."""
    return any(method_for(c).trains for c in configs)


def apply_all(model: nn.Module, configs: list[Any], calib: torch.Tensor | None = None, *,
              teacher: nn.Module | None = None, train_calib: torch.Tensor | None = None,
              state_dir: str | Path | None = None, fingerprint: dict[str, Any] | None = None,
              training: list[dict[str, Any]] | None = None, tokenizer: Any = None) -> nn.Module:  # fmt: skip
    """Apply configs in order (a recipe's steps).

    Steps that train get ``train_calib`` (if given; else ``calib``) and the
    teacher: ``teacher``, or a frozen copy of ``model`` as it is before the
    first step when a step needs one; a step that reads the original model
    (EoRA) gets that copy as ``original``. With ``state_dir``, step ``i`` keeps its
    resumable state in ``state_dir/step<i>-<method>`` under ``fingerprint``
    (plus the step); each training report is appended to ``training``.
    ``tokenizer`` (the model's) is checked against a teacher a step loads.
    """
    before = None  # the model before the recipe's first step: the teacher by default, and what EoRA reads
    if any(method_for(c).original for c in configs) or (
            teacher is None and any(getattr(c, "needs_teacher", False) for c in configs)):  # fmt: skip
        before = frozen_copy(model)
    teacher = teacher if teacher is not None else before
    for i, config in enumerate(configs):
        method = method_for(config)
        if method.original:
            model = apply(model, config, calib, original=before)
            continue
        if not method.trains:
            model = apply(model, config, calib)
            continue
        run = TrainRun(teacher=teacher, tokenizer=tokenizer, fingerprint={**(fingerprint or {}), "step": i, "config": repr(config)},
                       state_dir=Path(state_dir) / f"step{i}-{method.name}" if state_dir is not None else None)
        model = apply(model, config, train_calib if train_calib is not None else calib, run=run)
        if training is not None:
            training.extend(run.reports)
    return model
