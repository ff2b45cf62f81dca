"""W8A8 configs and handlers: naive int8 weights x int8 activations, and SmoothQuant.

``W8A8`` swaps each target linear for a :class:`W8A8Linear` (int8 per-row
weights, activations quantized per token at run time) or a
:class:`W8A8PerTensorLinear` (one activation scale per call: the naive
baseline that outlier channels break).

``SmoothQuant`` first smooths (``slimlm.quant.smoothquant``) every group of
linears fed by a norm, folding ``1 / s`` into the norm, then swaps the same
way. Linears not fed by a norm (o_proj, down_proj) are smoothed too where the
linear producing their input (the adapter's ``producers``) can absorb ``1 / s``
exactly in its rows (``fold_previous``): v_proj -> o_proj, up_proj -> down_proj
(gated MLP), fc1 -> fc2 (OPT with ReLU, which commutes with a positive scale).
Elsewhere (GPT-2's GELU MLP, fused GPT-2 and Phi-3 producers) they get plain
W8A8. The folding itself is :mod:`slimlm.quant.fold`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from slimlm.calib.runner import BlockContext, calibrate_blocks
from slimlm.calib.stats import StatsSpec
from slimlm.errors import SlimlmError
from slimlm.models.adapters import HeadLayout, head_layout
from slimlm.nn import W8A8_CLASSES, W8A8_WEIGHT_SCHEME, check_schemes, linear_weight
from slimlm.quant.fold import divide_outputs, fold_norm, producing_linear, scale_inputs
from slimlm.quant.smoothquant import grouped_head_scales, smoothing_scales, weight_absmax
from slimlm.targets import Targets, check_targets, replace_module, select_linears
from slimlm.validate import check_calib, check_pos_int

log = logging.getLogger("slimlm.quant")

ACT_GRANULARITIES = ("token", "tensor")

def _check_act(act: str) -> None:
    if act not in ACT_GRANULARITIES:
        raise SlimlmError(f"act_granularity {act!r} is not one of {', '.join(ACT_GRANULARITIES)}")


@dataclass(frozen=True)
class W8A8:
    """int8 per-channel weights x int8 activations quantized at run time, per ``token`` or ``tensor``."""

    act_granularity: str = "token"
    targets: Targets = field(default_factory=Targets)

    def __post_init__(self) -> None:
        _check_act(self.act_granularity)
        check_targets(self.targets)


@dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant with migration strength ``alpha`` in [0, 1], then W8A8."""

    alpha: float = 0.5
    targets: Targets = field(default_factory=Targets)
    act_granularity: str = "token"
    batch_size: int = 8
    fold_previous: bool = True  # also smooth o_proj/down_proj through the producing linear where exact

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise SlimlmError(f"alpha must be in [0, 1] (0.5 in the paper, up to 0.75-0.8 for strong outliers), "
                              f"got {self.alpha}")  # fmt: skip
        check_pos_int("batch_size", self.batch_size, "calibration sequences per forward, e.g. 8")
        _check_act(self.act_granularity)
        check_targets(self.targets)


def w8a8_plan(model: nn.Module, targets: Targets) -> dict[str, nn.Module]:
    """The target linears, refused up front where int8 per-channel weights do not fit."""
    chosen = select_linears(model, targets)
    check_schemes({name: (m, W8A8_WEIGHT_SCHEME) for name, m in chosen.items()})
    return chosen


def _swap(model: nn.Module, plan: dict[str, nn.Module], act: str, desc: str) -> nn.Module:
    cls = W8A8_CLASSES[act]
    for name, module in tqdm(plan.items(), desc=desc, unit="linear", leave=False):
        replace_module(model, name, cls.from_linear(module))
    return model


def apply_w8a8(model: nn.Module, config: W8A8, calib: Tensor | None = None) -> nn.Module:
    return _swap(model, w8a8_plan(model, config.targets), config.act_granularity, "W8A8")


def apply_smoothquant(model: nn.Module, config: SmoothQuant, calib: Tensor | None) -> nn.Module:
    calib = check_calib(calib, "SmoothQuant", purpose="for activation abs-max (or use W8A8() without smoothing)")
    plan = w8a8_plan(model, config.targets)
    smooth_model(model, calib, alpha=config.alpha, names=set(plan), fold_previous=config.fold_previous,
                 batch_size=config.batch_size)  # fmt: skip
    return _swap(model, plan, config.act_granularity, "SmoothQuant W8A8")


@torch.no_grad()
def smooth_model(model: nn.Module, calib: Tensor, *, alpha: float = 0.5, names: set[str] | None = None,
                 fold_previous: bool = True, batch_size: int = 8) -> int:  # fmt: skip
    """Smooth the float model in place (its function is unchanged); -> number of linear groups smoothed.

    ``names``: full linear names to smooth the inputs of (default: every decoder-block linear)."""
    names = set(select_linears(model, Targets())) if names is None else names
    layout = head_layout(model.config)
    done = 0

    def on_block(ctx: BlockContext) -> bool:
        nonlocal done
        done += _smooth_block(ctx, names, alpha, fold_previous, layout)
        return False  # exact: the block's outputs are unchanged

    calibrate_blocks(model, calib, on_block=on_block, spec=StatsSpec(absmax=True), batch_size=batch_size,
                     desc="SmoothQuant")  # fmt: skip
    log.info("SmoothQuant (alpha %.2f) smoothed %d linear groups", alpha, done)
    return done


def _smooth_block(ctx: BlockContext, names: set[str], alpha: float, fold_previous: bool, layout: HeadLayout) -> int:
    done = 0
    for group in ctx.groups:
        if not any(n in names for n in group.linears):
            continue
        Ws = [linear_weight(m)[0] for m in group.linears.values()]  # views (out, in) of the parameters
        x_absmax = torch.stack([ctx.stats[n].absmax for n in group.linears]).amax(0)  # (in,)
        w_absmax = weight_absmax(Ws)
        if group.norm is not None and getattr(group.norm, "weight", None) is not None:
            s = smoothing_scales(x_absmax, w_absmax, alpha)
            fold_norm(group.norm, s, offset=ctx.adapter.norm_weight_offset)
        else:
            s = _smooth_producer(ctx, group.linears, x_absmax, w_absmax, alpha, layout) if fold_previous else None
            if s is None:
                continue
        for linear in group.linears.values():
            scale_inputs(linear, s)
        done += 1
    return done


def _smooth_producer(ctx: BlockContext, linears: dict[str, nn.Module], x_absmax: Tensor, w_absmax: Tensor,
                     alpha: float, layout: HeadLayout) -> Tensor | None:  # fmt: skip
    """Fold ``1/s`` into the linear producing a norm-less group's input; -> ``s``, None where not exact."""
    (name,) = linears  # groups without a norm hold one linear
    found = producing_linear(ctx.block, ctx.adapter, name[len(ctx.prefix) + 1 :])
    if found is None or found[1].parts != 1:
        return None  # no producer, or a fused one (GPT-2's c_attn, Phi-3's qkv_proj)
    producer, how = found
    if how.through == "heads":
        if hasattr(ctx.block.get_submodule(how.linear.rpartition(".")[0]), "v_norm"):
            return None  # a norm on V (Gemma 3n) does not commute with a per-channel scale
        s, s_prev = grouped_head_scales(x_absmax, w_absmax, alpha, n_heads=layout.n_heads,
                                        n_kv_heads=layout.n_kv_heads, head_dim=layout.head_dim)  # fmt: skip
    else:
        s = s_prev = smoothing_scales(x_absmax, w_absmax, alpha)
    divide_outputs(producer, s_prev)
    return s
