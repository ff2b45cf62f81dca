"""The run state of :func:`slimlm.train.train`, saved atomically and restored exactly.

A run killed at any moment resumes to the same weights, bit for bit, as one
never interrupted: besides the weights, everything the next step reads is
saved, namely

* ``step``: steps done (the learning rate is a function of the step),
* ``model``: the model's full ``state_dict()`` (masks and buffers an
  ``on_step`` hook changes) and ``params``: the trained tensors themselves
  (they may live outside the model, e.g. a projection); tensors sharing
  storage are written once,
* ``optimizer``: AdamW's moments and step counts,
* ``generator``: the window sampler's RNG, ``torch_rng`` and ``python_rng``:
  the global ones (dropout, a hook's own draws),
* ``losses`` so far, ``seconds`` of training so far, the ``precision``
  chosen (a resumed run keeps it), and the ``fingerprint`` of the run.

The file is ``state_dir/train-state.pt``, replaced atomically (temp file in
the same directory, fsync, ``os.replace``): a kill during a save leaves the
previous state. A state whose fingerprint differs from the run's is refused
before anything is touched.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.fsutil import atomic_write_bytes
from slimlm.train.config import TrainConfig

STATE_FILE = "train-state.pt"
FORMAT = 1
_KEYS = ("format", "step", "model", "params", "optimizer", "generator", "torch_rng", "python_rng", "losses",
         "seconds", "precision", "fingerprint")  # fmt: skip
_RUNTIME_FIELDS = ("log_every", "checkpoint_every")  # config fields that do not change what is trained

__all__ = ["STATE_FILE", "capture_state", "load_state", "restore_state", "run_fingerprint", "save_state"]


def run_fingerprint(config: TrainConfig, fingerprint: dict | None) -> dict:
    """The caller's facts plus every config field that changes the training (``config.<name>``), JSON-normalised."""
    facts = {f"config.{k}": v for k, v in config.as_dict().items() if k not in _RUNTIME_FIELDS}
    facts.update(fingerprint or {})
    try:
        return json.loads(json.dumps(facts))  # tuples become lists, as they will read back
    except (TypeError, ValueError) as e:
        raise SlimlmError(f"training fingerprint must be JSON-able (strings, numbers, lists, dicts): {e}") from None


def capture_state(step: int, model: nn.Module, params: Sequence[Tensor], opt: torch.optim.Optimizer,
                  gen: torch.Generator, *, losses: list[float], seconds: float, precision: str,
                  fingerprint: dict, hook: object = None) -> dict:  # fmt: skip
    """Everything :func:`restore_state` needs to continue after ``step`` steps.

    ``hook``: the run's ``on_step``; when it keeps state of its own (gradual pruning's masks and
    event count), it offers ``state_dict()`` / ``load_state_dict()`` and that state is saved too.
    """
    return {"hook": hook.state_dict() if hasattr(hook, "state_dict") else None,
        "format": FORMAT, "step": step, "model": model.state_dict(), "params": [p.detach() for p in params],
        "optimizer": opt.state_dict(), "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(), "losses": list(losses), "seconds": seconds, "precision": precision,
        "fingerprint": fingerprint,
    }  # fmt: skip


def save_state(state_dir: str | Path, state: dict) -> Path:
    """Write ``state`` to ``state_dir/train-state.pt`` atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write_bytes(Path(state_dir) / STATE_FILE, buf.getvalue())


def _fix(state_dir: Path) -> str:
    return f"remove {state_dir} to start the run afresh, or choose another output"


def _first_difference(saved: dict, now: dict) -> str | None:
    for key in sorted(saved.keys() | now.keys()):
        if saved.get(key, "<absent>") != now.get(key, "<absent>"):
            return f"{key!r} differs (saved {saved.get(key, '<absent>')!r}, now {now.get(key, '<absent>')!r})"
    return None


def load_state(state_dir: str | Path, fingerprint: dict) -> dict | None:
    """The saved state of this run (on the CPU), None when there is none; another run's or a broken file is refused."""
    state_dir = Path(state_dir)
    path = state_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to read (zip, pickle, truncation) is one refusal naming its cause
        cause = str(e).splitlines()[0] if str(e) else ""
        raise SlimlmError(f"{path}: unreadable training state ({type(e).__name__}: {cause}); {_fix(state_dir)}") \
            from None  # fmt: skip
    if not isinstance(state, dict) or any(k not in state for k in _KEYS) or state["format"] != FORMAT:
        raise SlimlmError(f"{path}: not a slimlm training state of format {FORMAT}; {_fix(state_dir)}")
    difference = _first_difference(state["fingerprint"], fingerprint)
    if difference is not None:
        raise SlimlmError(f"{state_dir} holds the training state of another run: fingerprint key {difference}; "
                          f"{_fix(state_dir)}")  # fmt: skip
    return state


def restore_state(state: dict, model: nn.Module, params: Sequence[Tensor], opt: torch.optim.Optimizer,
                  gen: torch.Generator, *, hook: object = None) -> None:  # fmt: skip
    """Put ``state`` back: weights and buffers, the params, the optimizer, every RNG and the ``hook``'s state."""
    if len(state["params"]) != len(params) or any(s.shape != p.shape for s, p in zip(state["params"], params)):
        raise SlimlmError(f"training state holds {len(state['params'])} params that do not match the "
                          f"{len(params)} being trained; remove the state directory to start afresh")  # fmt: skip
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise SlimlmError(f"training state does not fit the model ({str(e).splitlines()[0]}); remove the "
                          f"state directory to start afresh") from None  # fmt: skip
    with torch.no_grad():
        for p, saved in zip(params, state["params"]):
            p.copy_(saved)
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(_as_tuples(state["python_rng"]))
    if state.get("hook") is not None and hasattr(hook, "load_state_dict"):
        hook.load_state_dict(state["hook"])


def _as_tuples(value: object) -> object:
    """``random.getstate()`` is nested tuples; a round trip may hand back lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
