"""TrainConfig: the training fields every method that trains shares, declared and checked once.

A method that trains (QAT, gradual magnitude pruning; next, distillation and
LoRA) subclasses :class:`TrainConfig` and adds its own fields, so a recipe
step stays flat (``- method: qat`` with ``steps: 20`` and ``scheme: ternary``
side by side) and :func:`dataclasses.fields` lists them all. The training
fields are keyword-only; a subclass that wants other defaults redeclares them
after a ``KW_ONLY`` marker.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from slimlm.errors import SlimlmError
from slimlm.train.precision import PRECISIONS

SCHEDULES = ("cosine", "constant")

__all__ = ["SCHEDULES", "TrainConfig", "check_number"]


def check_number(name: str, value: object, hint: str, *, integer: bool = False, zero_ok: bool = False) -> None:
    """``value`` is a number (an int when ``integer``; never a bool) ``> 0``, or ``>= 0`` when ``zero_ok``."""
    types = (int,) if integer else (int, float)
    ok = isinstance(value, types) and not isinstance(value, bool) and (value >= 0 if zero_ok else value > 0)
    if not ok:
        raise SlimlmError(f"{name} must be {'>= 0' if zero_ok else '> 0'} ({hint}), got {value!r}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """``steps`` AdamW steps on ``batch_size`` random ``seq_len``-token windows of the calibration ids.

    The learning rate rises linearly to ``lr`` over ``warmup`` steps, then
    decays to 0 along a cosine or stays constant (``schedule``); the gradient
    norm is clipped to ``grad_clip``. ``seed`` fixes the windows drawn.

    ``grad_accum``: micro-batches of ``batch_size`` windows whose gradients
    add up to one step (``batch_size * grad_accum`` windows per step).
    ``precision``: ``fp32``, ``bf16`` (forward and loss under bf16 autocast)
    or ``auto`` (bf16 only where a micro-benchmark finds it faster; see
    :mod:`slimlm.train.precision`). ``log_every``: steps between progress log
    lines; ``checkpoint_every``: steps between saves of the run state when
    the loop is given a state directory.
    """

    steps: int = 200
    lr: float = 1e-4
    seq_len: int = 256
    batch_size: int = 4
    schedule: str = "cosine"
    warmup: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    grad_accum: int = 1
    precision: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        check_number("steps", self.steps, "optimizer steps, e.g. 200", integer=True)
        check_number("seq_len", self.seq_len, "tokens per training window, e.g. 256", integer=True)
        check_number("batch_size", self.batch_size, "windows per step, e.g. 4", integer=True)
        check_number("warmup", self.warmup, "steps of linear warm-up", integer=True, zero_ok=True)
        check_number("lr", self.lr, "AdamW learning rate, e.g. 1e-4")
        check_number("weight_decay", self.weight_decay, "AdamW weight decay, e.g. 0.0", zero_ok=True)
        check_number("grad_clip", self.grad_clip, "max gradient norm, e.g. 1.0")
        if self.schedule not in SCHEDULES:
            raise SlimlmError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SlimlmError(f"seed must be an int, got {self.seed!r}")
        check_number("grad_accum", self.grad_accum, "micro-batches per optimizer step, e.g. 1", integer=True)
        if self.precision not in PRECISIONS:
            raise SlimlmError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        check_number("log_every", self.log_every, "steps between progress log lines, e.g. 10", integer=True)
        check_number("checkpoint_every", self.checkpoint_every, "steps between run-state saves, e.g. 50",
                     integer=True)  # fmt: skip

    def as_dict(self) -> dict[str, object]:
        """Every field by name, JSON-able: numbers, strings and bools as they are, anything else as ``str``."""
        plain = (bool, int, float, str, type(None))
        return {f.name: v if isinstance(v := getattr(self, f.name), plain) else str(v) for f in fields(self)}
