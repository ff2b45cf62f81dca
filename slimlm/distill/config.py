"""Distill: the recipe step that trains a compressed student towards a teacher.

One config for the field's three families, mixed as the user asks:

* logit KD (``loss: kl``, forward KL at a ``temperature``, Hinton et al.
  2015; ``loss: reverse_kl``, the mode-seeking token-level form of MiniLLM's
  objective), optionally on the teacher's ``top_k`` logits only, and mixed
  with next-token cross-entropy by ``ce_weight``; ``loss: ce`` is plain
  fine-tuning on the text (the baseline KD is measured against);
* hidden-state KD (``hidden_weight > 0``: MSE or cosine between student and
  teacher hidden states over a ``layer_map``, found from the blocks a depth
  pruning kept when not given; TinyBERT, Minitron);
* sequence-level KD (``data: teacher``: the teacher first continues
  ``gen_samples`` calibration prompts of ``prompt_len`` tokens, the student
  then trains on those sequences; Kim & Rush 2016).

The teacher is the model as it was before the recipe's first step, or
``teacher: <model source>`` (same tokenizer). The training fields are
:class:`~slimlm.train.TrainConfig`'s; ``samples`` is how many calibration
sequences a recipe draws for training (more than a calibration method needs);
``targets`` the decoder-block linears that train (default all; the others,
and packed quantized ones, stay fixed; norms, embeddings and lm_head train).
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field

from slimlm.distill.hidden import HIDDEN_KINDS
from slimlm.errors import SlimlmError
from slimlm.targets import Targets, check_targets
from slimlm.train import TrainConfig, check_number

LOSSES = ("kl", "reverse_kl", "ce")

DATA = ("calib", "teacher")

__all__ = ["DATA", "LOSSES", "Distill"]


def _pairs(layer_map: object) -> tuple[tuple[int, int], ...] | None:
    """YAML's ``[[0, 0], [1, 4]]`` -> ``((0, 0), (1, 4))``; None stays None (found automatically)."""
    if layer_map is None:
        return None
    ok = isinstance(layer_map, (list, tuple)) and len(layer_map) > 0 and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(i, int) and not isinstance(i, bool)
                                                             and i >= 0 for i in p) for p in layer_map)  # fmt: skip
    if not ok:
        raise SlimlmError(f"layer_map must be a non-empty list of [student_layer, teacher_layer] pairs of layer "
                          f"indices >= 0, e.g. [[0, 0], [1, 3]], or omitted (found from the kept blocks); "
                          f"got {layer_map!r}")  # fmt: skip
    return tuple((int(s), int(t)) for s, t in layer_map)


@dataclass(frozen=True)
class Distill(TrainConfig):
    """Train the student's float parameters to match ``teacher`` (see the module docstring for each field)."""

    loss: str = "kl"
    temperature: float = 1.0
    ce_weight: float = 0.0
    top_k: int | None = None
    hidden_weight: float = 0.0
    hidden_loss: str = "mse"
    layer_map: tuple[tuple[int, int], ...] | None = None
    data: str = "calib"
    prompt_len: int = 32
    gen_samples: int = 64
    teacher: str | None = None
    samples: int = 512
    targets: Targets = field(default_factory=Targets)
    _: KW_ONLY  # TrainConfig's fields with this method's defaults
    lr: float = 3e-4
    warmup: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_map", _pairs(self.layer_map))
        super().__post_init__()
        check_targets(self.targets)
        if self.loss not in LOSSES:
            raise SlimlmError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        check_number("temperature", self.temperature, "softmax temperature of logit KD, e.g. 1 or 2")
        if isinstance(self.ce_weight, bool) or not isinstance(self.ce_weight, (int, float)) \
                or not 0.0 <= self.ce_weight <= 1.0:  # fmt: skip
            raise SlimlmError(f"ce_weight must be in [0, 1] (the share of next-token cross-entropy mixed into the "
                              f"KD loss), got {self.ce_weight!r}")  # fmt: skip
        if self.top_k is not None:
            check_number("top_k", self.top_k, "teacher logits kept per position, e.g. 64", integer=True)
            if self.loss != "kl":
                raise SlimlmError(f"top_k works with loss kl only (a top-k teacher has no mass elsewhere to "
                                  f"compare {self.loss} with); drop top_k or use loss: kl")  # fmt: skip
        check_number("hidden_weight", self.hidden_weight, "weight of the hidden-state loss, e.g. 1.0", zero_ok=True)
        if self.hidden_loss not in HIDDEN_KINDS:
            raise SlimlmError(f"hidden_loss must be one of {', '.join(HIDDEN_KINDS)}, got {self.hidden_loss!r}")
        if self.data not in DATA:
            raise SlimlmError(f"data must be calib (calibration text) or teacher (text the teacher generates "
                              f"from calibration prompts), got {self.data!r}")  # fmt: skip
        check_number("prompt_len", self.prompt_len, "tokens of each calibration prompt the teacher continues",
                     integer=True)  # fmt: skip
        if self.data == "teacher" and self.prompt_len >= self.seq_len:
            raise SlimlmError(f"prompt_len {self.prompt_len} leaves nothing for the teacher to generate in "
                              f"seq_len {self.seq_len}; use a prompt_len below seq_len, e.g. 32")  # fmt: skip
        check_number("gen_samples", self.gen_samples, "sequences the teacher generates, e.g. 64", integer=True)
        check_number("samples", self.samples, "calibration sequences drawn for training, e.g. 512", integer=True)
        if self.teacher is not None and (not isinstance(self.teacher, str) or not self.teacher.strip()):
            raise SlimlmError(f"teacher must be a model source (built-in name, directory, hub id, .gguf), "
                              f"got {self.teacher!r}")  # fmt: skip

    @property
    def needs_teacher(self) -> bool:
        """Plain fine-tuning on the calibration text (``loss: ce``, no hidden loss) needs no teacher."""
        return self.loss != "ce" or self.hidden_weight > 0 or self.data == "teacher"
