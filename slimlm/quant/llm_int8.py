"""LLM.int8(): vector-wise int8 with a float path for outlier features (Dettmers et al. 2022, arXiv:2208.07339).

From about 6.7B parameters on, a handful of hidden feature dimensions carry
activations of magnitude 6 to 60+ in most tokens; int8 with one scale per
token loses the other features' precision to them. LLM.int8() splits the
matrix product by input column: outlier columns (``|x| > threshold``, 6.0)
in float, the rest in vector-wise int8 -- see
:class:`slimlm.nn.OutlierLinear` for the runtime side.

Here, with calibration (``calibrated=True``), a column whose calibration
abs-max exceeds the threshold is a *fixed* outlier: its weight column stays
float16. Columns that exceed the threshold only at run time are still caught
per forward (activations in float, weights from their int8 codes), as in the
paper. Without calibration every outlier is caught that way.

``smooth_alpha`` first applies SmoothQuant's exact rescaling to the float
model (:func:`slimlm.quant.w8a8.smooth_model`), so the int8 part sees flatter
activations; the decomposition then runs on the smoothed model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from slimlm.calib.runner import BlockContext, calibrate_blocks
from slimlm.calib.stats import StatsSpec
from slimlm.errors import SlimlmError
from slimlm.nn import OutlierLinear
from slimlm.quant.w8a8 import smooth_model, w8a8_plan
from slimlm.targets import Targets, check_targets, replace_module
from slimlm.validate import check_calib, check_pos_int


@torch.no_grad()
def outlier_columns(x_absmax: Tensor, threshold: float) -> Tensor:
    """Indices ``(n,)`` of the input columns whose abs-max exceeds ``threshold`` (none for inf)."""
    return (x_absmax.float() > threshold).nonzero().squeeze(1)


@dataclass(frozen=True)
class LLMInt8:
    """Vector-wise int8 weights and activations, outlier input columns (``|x| > threshold``) in float."""

    threshold: float = 6.0
    targets: Targets = field(default_factory=Targets)
    calibrated: bool = True  # fix outlier columns (float16 weights) from calibration abs-max
    batch_size: int = 8
    smooth_alpha: float | None = None  # SmoothQuant-smooth the float model first (needs calibration)

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", float(self.threshold))
        if not self.threshold > 0 or math.isnan(self.threshold):
            raise SlimlmError(f"threshold must be > 0 (6.0 in the paper; inf = plain vector-wise int8), "
                              f"got {self.threshold}")  # fmt: skip
        check_pos_int("batch_size", self.batch_size, "calibration sequences per forward, e.g. 8")
        check_targets(self.targets)
        if self.smooth_alpha is not None and not 0.0 <= float(self.smooth_alpha) <= 1.0:
            raise SlimlmError(f"smooth_alpha must be in [0, 1] (0.5 as in SmoothQuant) or unset for no smoothing, "
                              f"got {self.smooth_alpha}")  # fmt: skip


def apply_llm_int8(model: nn.Module, config: LLMInt8, calib: Tensor | None) -> nn.Module:
    plan = w8a8_plan(model, config.targets)
    if config.smooth_alpha is not None:
        calib = check_calib(calib, "LLMInt8(smooth_alpha=...)",
                            purpose="for the smoothing scales (or leave smooth_alpha unset)")  # fmt: skip
        smooth_model(model, calib, alpha=config.smooth_alpha, names=set(plan), batch_size=config.batch_size)
    if not config.calibrated:
        for name, module in tqdm(plan.items(), desc="LLM.int8", unit="linear", leave=False):
            replace_module(model, name, OutlierLinear.from_linear(module, threshold=config.threshold))
        return model
    calib = check_calib(calib, "LLMInt8(calibrated=True)",
                        purpose="to find outlier columns (or LLMInt8(calibrated=False) for run-time detection only)")
    fixed: dict[str, int] = {}

    def on_block(ctx: BlockContext) -> bool:
        for name, module in ctx.linears.items():
            if name in plan:
                idx = outlier_columns(ctx.stats[name].absmax, config.threshold)
                fixed[name] = idx.numel()
                replace_module(model, name, OutlierLinear.from_linear(module, threshold=config.threshold,
                                                                      outlier_columns=idx))  # fmt: skip
        return True  # the next block sees this block's int8 outputs

    calibrate_blocks(model, calib, on_block=on_block, spec=StatsSpec(absmax=True), batch_size=config.batch_size,
                     desc="LLM.int8")  # fmt: skip
    for name, module in plan.items():  # targets outside the decoder blocks (lm_head)
        if name not in fixed:
            replace_module(model, name, OutlierLinear.from_linear(module, threshold=config.threshold))
    return model
