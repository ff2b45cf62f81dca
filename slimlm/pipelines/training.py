"""What a recipe with training steps adds to compress(): training text, a resumable state, teacher checks.

* Training ids: steps that train (distillation, QAT, gradual pruning) draw
  ``max(samples)`` sequences of the protocol's calibration split (never its
  evaluation text); a calibration method in the same recipe keeps its own,
  smaller batch.
* Resumable: the run's state lives in ``<out>.train/`` beside the output
  (one directory per training step, see :func:`slimlm.train.train`); the
  same command started again after a kill resumes from the last checkpoint.
  ``run.json`` there names the run (model, recipe, protocol, samples): a
  directory left by another run is refused before any work, and the
  directory is removed once the checkpoint is saved.
* A teacher named by a source (``teacher: <model>``) must exist, checked
  before any work.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from slimlm.api import trains
from slimlm.data import bos_id
from slimlm.errors import SlimlmError
from slimlm.eval import Protocol, calibration_ids
from slimlm.fsutil import atomic_write_text
from slimlm.models.source import resolve_source

log = logging.getLogger("slimlm.pipelines")

__all__ = ["TrainingSetup", "prepare_training"]


class TrainingSetup:
    """The training ids, state directory and fingerprint of one compress() run (all None without training)."""

    def __init__(self, ids: torch.Tensor | None, state_dir: Path | None, fingerprint: dict[str, Any] | None):
        self.ids, self.state_dir, self.fingerprint = ids, state_dir, fingerprint
        self.reports: list[dict[str, Any]] = []

    def apply_kwargs(self) -> dict[str, Any]:
        return dict(train_calib=self.ids, state_dir=self.state_dir, fingerprint=self.fingerprint,
                    training=self.reports)  # fmt: skip

    def finished(self) -> None:
        """The checkpoint is saved: the resumable state has done its job."""
        if self.state_dir is not None and self.state_dir.exists():
            shutil.rmtree(self.state_dir)


def _claim(state_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse a state directory another run left; else (re)write its run.json."""
    marker = state_dir / "run.json"
    if marker.is_file():
        try:
            theirs = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SlimlmError(f"{marker} cannot be read ({e}); remove {state_dir} to start the training over") from e
        if theirs != fingerprint:
            diff = sorted(k for k in {*theirs, *fingerprint} if theirs.get(k) != fingerprint.get(k))
            raise SlimlmError(f"{state_dir} holds the training state of another run ({', '.join(diff)} differ); "
                              f"remove it, or choose another --out")  # fmt: skip
        log.info("resuming the training state in %s", state_dir)
    elif state_dir.exists() and any(state_dir.iterdir()):
        raise SlimlmError(f"{state_dir} exists and is not a slimlm training state; remove it or choose another --out")
    state_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps(fingerprint, indent=1, sort_keys=True) + "\n", overwrite=True)


def prepare_training(steps: list[Any], tokenizer: Any, protocol: Protocol, out: Path, *, model: str,
                     recipe: Any, calib_samples: int | None) -> TrainingSetup:  # fmt: skip
    """Check teachers, draw the training ids and claim the state directory, when a step trains."""
    if not trains(steps):
        return TrainingSetup(None, None, None)
    for step in steps:
        if getattr(step, "teacher", None) is not None:
            resolve_source(step.teacher)  # an unknown or missing teacher, before any work
    wanted = [s.samples for s in steps if isinstance(getattr(s, "samples", None), int)]
    n = max(wanted) if wanted else calib_samples
    ids = calibration_ids(tokenizer, protocol, n_samples=n)  # (n, seq_len)
    fingerprint = dict(model=model, recipe=recipe, protocol=protocol.name, samples=ids.shape[0],
                       bos=bos_id(tokenizer) is not None)  # fmt: skip
    fingerprint = json.loads(json.dumps(fingerprint, default=str))  # as run.json holds it
    state_dir = out.with_name(out.name + ".train")
    _claim(state_dir, fingerprint)
    return TrainingSetup(ids, state_dir, fingerprint)
