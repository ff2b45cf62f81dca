"""Quantization-aware training (QAT): fine-tune latent float weights through the quantizer.

Each target linear becomes a :class:`~slimlm.nn.fake_quant.FakeQuantLinear`
whose forward multiplies by ``Q(W)`` (the scheme's reference quantize then
dequantize) and whose backward passes the gradient straight through the
rounding, ``dL/dW = dL/dQ(W)`` (STE; Bengio et al. 2013, arXiv:1308.3432;
as used by LLM-QAT, Liu et al. 2023, arXiv:2305.17888, and BitNet b1.58,
Ma et al. 2024, arXiv:2402.17764). A short run on the calibration tokens
trains the latent weights, with either

* next-token cross-entropy on the calibration ids, or
* ``distill=True``: KL(p_float || p_quant) to the frozen float model's
  next-token distributions (LLM-QAT's data-free distillation objective,
  here on calibration text),

then every FakeQuantLinear is converted to a real QuantLinear storing
``Q(W)`` of its trained latent weight (the same reference quantizer, so the
conversion is exact).

Ternary (1.58-bit): slimlm's :class:`~slimlm.formats.TernaryScheme` keeps
``|w| > threshold * mean_row|W|`` as ``sign(w) * a`` with ``a`` the mean
``|w|`` of the *kept* weights of the row (TWN). BitNet b1.58's absmean
rounding ``clip(round(W / mean|W|), -1, 1)`` is the ``threshold=0.5`` rule
with ``a = mean|W|`` over *all* weights (per tensor in the paper). We train
through slimlm's scheme as stored (so conversion is exact); the TWN scale is
the L2-optimal one for the kept set. Activations stay in float (weight-only).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from slimlm.errors import SlimlmError
from slimlm.formats import IntScheme, PerGroup, Scheme, parse_scheme
from slimlm.nn.fake_quant import FakeQuantLinear, ste_fake_quantize
from slimlm.quant.rtn import check_schemes
from slimlm.targets import Targets, replace_module, select_linears

log = logging.getLogger("slimlm.quant")

SCHEDULES = ("cosine", "constant")

__all__ = ["QAT", "QATReport", "apply_qat", "distill_loss", "lr_at", "next_token_loss", "sample_batch",
           "ste_fake_quantize", "swap_fake_quant", "to_quant_linears", "train_qat"]  # fmt: skip


def _positive(name: str, value: object, kind: type, hint: str, *, zero_ok: bool = False) -> None:
    """Refuse a non-number (ints only when ``kind`` is int) or a value below the allowed range."""
    types = (int,) if kind is int else (int, float)
    ok = isinstance(value, types) and not isinstance(value, bool) and (value >= 0 if zero_ok else value > 0)
    if not ok:
        raise SlimlmError(f"{name} must be {'>= 0' if zero_ok else '> 0'} ({hint}), got {value!r}")


@dataclass(frozen=True)
class QAT:
    """Train the target linears' latent weights through ``scheme``'s quantizer, then store them in it.

    ``steps`` AdamW steps of ``batch_size`` random ``seq_len``-token windows of
    the calibration ids; learning rate ``lr`` after ``warmup`` linear steps,
    then cosine decay to 0 or constant; gradient norm clipped to ``grad_clip``.
    """

    needs_calibration: ClassVar[bool] = True

    scheme: Scheme = IntScheme(bits=4, granularity=PerGroup(64))
    steps: int = 200
    lr: float = 1e-4
    seq_len: int = 256
    batch_size: int = 4
    distill: bool = True
    schedule: str = "cosine"
    warmup: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    targets: Targets = field(default_factory=Targets)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", parse_scheme(self.scheme))
        for name, hint in (("steps", "e.g. 200"), ("seq_len", "e.g. 256"), ("batch_size", "e.g. 4")):
            _positive(name, getattr(self, name), int, hint)
        _positive("warmup", self.warmup, int, "steps of linear warm-up", zero_ok=True)
        _positive("lr", self.lr, float, "e.g. 1e-4")
        _positive("weight_decay", self.weight_decay, float, "e.g. 0.0", zero_ok=True)
        _positive("grad_clip", self.grad_clip, float, "max gradient norm, e.g. 1.0")
        if not isinstance(self.distill, bool):
            raise SlimlmError(f"distill must be true or false, got {self.distill!r}")
        if self.schedule not in SCHEDULES:
            raise SlimlmError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SlimlmError(f"seed must be an int, got {self.seed!r}")
        if not isinstance(self.targets, Targets):
            raise SlimlmError(f"targets must be a Targets(...), got {self.targets!r}")


@dataclass(frozen=True)
class QATReport:
    losses: list[float]  # training loss per step
    seconds: float  # training time
    tokens: int  # tokens seen (steps x batch x seq_len)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(len(self.losses), 1)


# --- pure pieces ---------------------------------------------------------------


def sample_batch(calib: Tensor, *, seq_len: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """``(B, T)`` random windows of the calibration ids ``(N, L)``, ``T = min(seq_len, L)``."""
    N, L = calib.shape
    T = min(seq_len, L)
    rows = torch.randint(N, (batch_size,), generator=generator)
    starts = torch.randint(L - T + 1, (batch_size,), generator=generator)
    return torch.stack([calib[r, s : s + T] for r, s in zip(rows.tolist(), starts.tolist())])  # (B, T)


def next_token_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits (B, T, V)`` predicting ``ids[:, 1:]``."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, V), ids[:, 1:].reshape(-1))


def distill_loss(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean per-token KL(p_teacher || p_student), both ``(B, T, V)``."""
    V = logits.shape[-1]
    log_p = F.log_softmax(logits.float().reshape(-1, V), dim=-1)  # (B*T, V)
    log_q = F.log_softmax(teacher_logits.float().reshape(-1, V), dim=-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")


def lr_at(step: int, *, steps: int, lr: float, schedule: str, warmup: int) -> float:
    """Learning rate of ``step`` (0-based): linear warm-up, then cosine to 0 or constant."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(steps - warmup, 1)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# --- module swap and training loop ----------------------------------------------


def swap_fake_quant(model: nn.Module, scheme: Scheme, targets: Targets) -> dict[str, FakeQuantLinear]:
    """Replace each target linear by a FakeQuantLinear (latent weight = its float weight)."""
    linears = select_linears(model, targets)
    check_schemes({name: (m, scheme) for name, m in linears.items()})
    swapped = {}
    for name, module in linears.items():
        swapped[name] = FakeQuantLinear.from_linear(module, scheme)
        replace_module(model, name, swapped[name])
    return swapped


def to_quant_linears(model: nn.Module, fake: dict[str, FakeQuantLinear]) -> None:
    """Swap each FakeQuantLinear for the QuantLinear storing its quantized latent weight."""
    for name, module in fake.items():
        replace_module(model, name, module.to_quant_linear())


def _loss(model: nn.Module, teacher: nn.Module | None, ids: Tensor) -> Tensor:
    logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
    if teacher is None:
        return next_token_loss(logits, ids)
    with torch.no_grad():
        target = teacher(input_ids=ids, use_cache=False).logits
    return distill_loss(logits, target)


def train_qat(model: nn.Module, params: list[nn.Parameter], calib: Tensor, config: QAT, *,
              teacher: nn.Module | None = None, on_step: Callable[[int], None] | None = None,
              desc: str = "QAT") -> QATReport:  # fmt: skip
    """AdamW on ``params`` only (everything else frozen for the run); the model ends in eval mode.

    ``config`` is any config with QAT's training fields (steps, lr, schedule, warmup, seq_len,
    batch_size, weight_decay, grad_clip, seed): gradual magnitude pruning trains with it too.
    ``on_step(step)`` runs after each optimizer step (pruning re-applies its masks there).
    """
    device = params[0].device
    gen = torch.Generator().manual_seed(config.seed)
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    losses, t0 = [], time.perf_counter()
    bar = tqdm(range(config.steps), desc=desc, unit="step", leave=False)
    try:
        model.train()
        with torch.enable_grad():  # apply() runs handlers under no_grad
            for step in bar:
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, steps=config.steps, lr=config.lr, schedule=config.schedule,
                                        warmup=config.warmup)  # fmt: skip
                ids = sample_batch(calib, seq_len=config.seq_len, batch_size=config.batch_size, generator=gen)
                loss = _loss(model, teacher, ids.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                opt.step()
                if on_step is not None:
                    with torch.no_grad():
                        on_step(step)
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        model.eval()
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    seconds = time.perf_counter() - t0
    tokens = config.steps * config.batch_size * min(config.seq_len, calib.shape[1])
    return QATReport(losses, seconds, tokens)


def apply_qat(model: nn.Module, config: QAT, calib: Tensor | None = None) -> nn.Module:
    """Swap in FakeQuantLinears, train them on ``calib`` (N, L) ids, convert to QuantLinears."""
    if calib is None:
        raise SlimlmError("QAT needs calibration token ids to train on: pass calib=calibration_batch(...) "
                          "(or run it from a recipe, which builds them)")  # fmt: skip
    check_schemes({name: (m, config.scheme) for name, m in select_linears(model, config.targets).items()})
    teacher = None
    if config.distill:
        teacher = copy.deepcopy(model).eval()  # the float model before the swap
        for p in teacher.parameters():
            p.requires_grad_(False)
    fake = swap_fake_quant(model, config.scheme, config.targets)
    params = [p for m in fake.values() for p in m.parameters()]
    report = train_qat(model, params, calib, config, teacher=teacher)
    del teacher
    k = max(1, min(10, len(report.losses) // 4))
    log.info("QAT %s: %d steps, %d tokens, %.1f s (%.2f s/step); loss %.4f -> %.4f (mean of first/last %d)",
             config.scheme, len(report.losses), report.tokens, report.seconds, report.seconds_per_step,
             sum(report.losses[:k]) / k, sum(report.losses[-k:]) / k, k)  # fmt: skip
    with torch.no_grad():
        to_quant_linears(model, fake)
    return model
