"""Quantization-aware training (QAT): fine-tune latent float weights through the quantizer.

Each target linear becomes a :class:`~slimlm.nn.fake_quant.FakeQuantLinear`
whose forward multiplies by ``Q(W)`` (the scheme's reference quantize then
dequantize) and whose backward passes the gradient straight through the
rounding, ``dL/dW = dL/dQ(W)`` (STE; Bengio et al. 2013, arXiv:1308.3432;
as used by LLM-QAT, Liu et al. 2023, arXiv:2305.17888, and BitNet b1.58,
Ma et al. 2024, arXiv:2402.17764). A short run on the calibration tokens
trains the latent weights (the one loop, :func:`slimlm.train.train`), with either

* next-token cross-entropy on the calibration ids, or
* ``distill=True``: KL(p_float || p_quant) to the frozen float model's
  next-token distributions (LLM-QAT's data-free distillation objective,
  here on calibration text; :func:`slimlm.distill.forward_kl`),

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

from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field

import torch
from torch import Tensor, nn

from slimlm.distill import recovery_objective, teacher_objective
from slimlm.formats import IntScheme, PerGroup, Scheme, parse_scheme
from slimlm.nn import check_schemes
from slimlm.nn.fake_quant import FakeQuantLinear
from slimlm.targets import Targets, check_targets, replace_module, select_linears
from slimlm.train import TrainConfig, TrainReport, TrainRun, next_token_objective, train
from slimlm.validate import check_bool, check_calib

__all__ = ["QAT", "apply_qat", "swap_fake_quant", "to_quant_linears", "train_qat"]


@dataclass(frozen=True)
class QAT(TrainConfig):
    """Train the target linears' latent weights through ``scheme``'s quantizer, then store them in it.

    The training fields (``steps``, ``lr``, ``schedule``, ``warmup``,
    ``seq_len``, ``batch_size``, ``weight_decay``, ``grad_clip``,
    ``seed``) are :class:`~slimlm.train.TrainConfig`'s, with its defaults.
    """

    scheme: Scheme = IntScheme(bits=4, granularity=PerGroup(64))
    targets: Targets = field(default_factory=Targets)
    _: KW_ONLY
    distill: bool = True  # KL to the model as it was before this step, else next-token cross-entropy

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", parse_scheme(self.scheme))
        super().__post_init__()
        check_bool("distill", self.distill)
        check_targets(self.targets)


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


def train_qat(model: nn.Module, params: Sequence[nn.Parameter], calib: Tensor, config: QAT, *,
              teacher: nn.Module | None = None,
              on_step: Callable[[int], None] | None = None) -> TrainReport:  # fmt: skip
    """:func:`slimlm.train.train` on ``params``: forward KL to ``teacher``, or next-token loss without one."""
    objective = next_token_objective if teacher is None else teacher_objective(teacher)
    return train(model, params, objective, calib, config, on_step=on_step, desc=f"QAT {config.scheme}")


def apply_qat(model: nn.Module, config: QAT, calib: Tensor | None = None, *, run: TrainRun | None = None) -> nn.Module:
    """Swap in FakeQuantLinears, train them on ``calib`` (N, L) ids, convert to QuantLinears."""
    check_calib(calib, "QAT", purpose="to train on")
    check_schemes({name: (m, config.scheme) for name, m in select_linears(model, config.targets).items()})
    objective = recovery_objective(model, distill=config.distill)  # the float model, before the swap
    fake = swap_fake_quant(model, config.scheme, config.targets)
    params = [p for m in fake.values() for p in m.parameters()]
    report = train(model, params, objective, calib, config, desc=f"QAT {config.scheme}",
                   **(run.train_kwargs() if run else {}))  # fmt: skip
    if run is not None:
        run.reports.append({"method": "qat", **report.to_json()})
    del objective  # the teacher copy, if any
    with torch.no_grad():
        to_quant_linears(model, fake)
    return model
