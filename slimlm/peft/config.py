"""Configs of the parameter-efficient fine-tuning methods: a frozen base, a few trained parameters.

Every config extends :class:`~slimlm.train.TrainConfig` (steps, lr, batch_size,
seq_len, ... declared once) with what the shared handler needs:

* ``loss``: ``ce`` (next-token cross-entropy on the training text: adaptation)
  or ``kl`` (forward KL to the teacher at ``temperature``: recovery of a
  compressed model; the teacher is the model before the recipe's first step,
  or ``teacher: <model source>``), the objectives of :mod:`slimlm.distill`;
* ``samples``: calibration sequences a recipe draws for training.

Methods: :class:`LoRA` (Hu et al. 2021), :class:`DoRA` (Liu et al. 2024),
:class:`QLoRA` (Dettmers et al. 2023: LoRA on a quantized frozen base),
:class:`IA3` (Liu et al. 2022), :class:`Adapters` (Houlsby et al. 2019),
:class:`PromptTuning` (Lester et al. 2021) and :class:`BitFit` (Ben Zaken et
al. 2022).
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field

from slimlm.errors import SlimlmError
from slimlm.formats import parse_scheme
from slimlm.formats.scheme import NF4Scheme, Scheme
from slimlm.targets import Targets, check_targets
from slimlm.train import TrainConfig, check_number

PEFT_LOSSES = ("ce", "kl")
NONLINEARITIES = ("gelu", "relu", "silu")
PROMPT_INITS = ("vocab", "random")
IA3_TARGETS = Targets(include=("*.k_proj", "*.v_proj", "*.down_proj"))

__all__ = ["IA3", "IA3_TARGETS", "NONLINEARITIES", "PEFT_LOSSES", "PROMPT_INITS", "Adapters", "BitFit", "DoRA",
           "LoRA", "PeftTrain", "PromptTuning", "QLoRA"]  # fmt: skip


@dataclass(frozen=True)
class PeftTrain(TrainConfig):
    """The fields every PEFT method shares (see the module docstring)."""

    loss: str = "ce"
    temperature: float = 1.0
    teacher: str | None = None
    samples: int = 512
    _: KW_ONLY
    lr: float = 1e-3
    warmup: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in PEFT_LOSSES:
            raise SlimlmError(f"loss must be ce (next-token fine-tuning) or kl (distil from the teacher), "
                              f"got {self.loss!r}")  # fmt: skip
        check_number("temperature", self.temperature, "softmax temperature of the kl loss, e.g. 1")
        check_number("samples", self.samples, "calibration sequences drawn for training, e.g. 512", integer=True)
        if self.teacher is not None and (not isinstance(self.teacher, str) or not self.teacher.strip()):
            raise SlimlmError(f"teacher must be a model source (built-in name, directory, hub id), "
                              f"got {self.teacher!r}")  # fmt: skip

    @property
    def needs_teacher(self) -> bool:
        return self.loss == "kl"

    @property
    def leaves_adapter(self) -> bool:
        """Whether the trained parameters stay beside the base (no slimlm checkpoint form: save_adapter)."""
        return True


@dataclass(frozen=True)
class LoRA(PeftTrain):
    """``W x + (alpha / r) B A x`` on each target linear; A (r, in) random, B (out, r) zero, W frozen.

    ``merge``: after training fold ``(alpha / r) B A`` into W (float targets:
    exact up to rounding; quantized targets are refused unless ``requantize``,
    which re-rounds ``dequant(Q) + BA`` in the layer's scheme and reports the
    KLD it costs). Without ``merge`` the adapter stays beside the base.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: Targets = field(default_factory=Targets)
    merge: bool = False
    requantize: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("r", self.r, "LoRA rank, e.g. 16", integer=True)
        check_number("alpha", self.alpha, "LoRA scale numerator (scale = alpha / r), e.g. 32")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:  # fmt: skip
            raise SlimlmError(f"dropout must be in [0, 1) (LoRA input dropout), got {self.dropout!r}")
        check_targets(self.targets)
        for name in ("merge", "requantize"):
            if not isinstance(getattr(self, name), bool):
                raise SlimlmError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.requantize and not self.merge:
            raise SlimlmError("requantize applies to merge: set merge: true as well, or drop requantize")

    @property
    def leaves_adapter(self) -> bool:
        return not self.merge


@dataclass(frozen=True)
class DoRA(LoRA):
    """LoRA on the direction with a trained per-row magnitude: ``m * (W + sBA) / ||W + sBA||_row`` (float bases)."""


@dataclass(frozen=True)
class QLoRA(LoRA):
    """LoRA on a quantized frozen base: float targets are first rounded to ``scheme`` (RTN; NF4 by default),
    targets already quantized by an earlier step (GPTQ, AWQ, RTN) keep their codes."""

    scheme: Scheme = NF4Scheme()

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", parse_scheme(self.scheme))
        super().__post_init__()


@dataclass(frozen=True)
class IA3(PeftTrain):
    """Learned rescaling vectors: outputs of attention k/v, inputs of the MLP's down projection (float bases)."""

    targets: Targets = field(default_factory=lambda: IA3_TARGETS)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_targets(self.targets)


@dataclass(frozen=True)
class Adapters(PeftTrain):
    """Houlsby bottlenecks after the attention and the MLP of each block: ``h + up(act(down(h)))``, up zero.

    ``targets`` filters the blocks' output linears (o_proj, down_proj) whose output gets one."""

    size: int = 16
    nonlinearity: str = "gelu"
    targets: Targets = field(default_factory=Targets)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_targets(self.targets)
        check_number("size", self.size, "bottleneck width, e.g. 16", integer=True)
        if self.nonlinearity not in NONLINEARITIES:
            raise SlimlmError(f"nonlinearity must be one of {', '.join(NONLINEARITIES)}, got {self.nonlinearity!r}")


@dataclass(frozen=True)
class PromptTuning(PeftTrain):
    """``n_tokens`` trained input embeddings prepended to every sequence; ``init`` from random vocabulary rows."""

    n_tokens: int = 16
    init: str = "vocab"
    targets: Targets = field(default_factory=Targets)  # must stay empty: a soft prompt sits on no linear
    _: KW_ONLY
    lr: float = 3e-2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_targets(self.targets)
        if self.targets != Targets():
            raise SlimlmError("prompt_tuning trains input embeddings, not linears: drop include/exclude/lm_head")
        check_number("n_tokens", self.n_tokens, "soft prompt length, e.g. 16", integer=True)
        if self.init not in PROMPT_INITS:
            raise SlimlmError(f"init must be one of {', '.join(PROMPT_INITS)}, got {self.init!r}")


@dataclass(frozen=True)
class BitFit(PeftTrain):
    """Train biases and norm weights only. LLaMA-family linears have no bias: ``zero_biases`` adds zero
    biases to the target linears first (then trained; declared in the model's config, e.g. ``attention_bias``,
    so the model saves and reloads with them); without it only existing biases and norms train."""

    zero_biases: bool = False
    targets: Targets = field(default_factory=Targets)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_targets(self.targets)
        if not isinstance(self.zero_biases, bool):
            raise SlimlmError(f"zero_biases must be true or false, got {self.zero_biases!r}")

    @property
    def leaves_adapter(self) -> bool:  # norms and biases train in place; added biases are declared in the config
        return False
