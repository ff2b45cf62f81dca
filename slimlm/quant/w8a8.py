"""W8A8 configs and handlers: naive int8 weights x int8 activations, and SmoothQuant.

``W8A8`` swaps each target linear for a :class:`W8A8Linear` (int8 per-row
weights, activations quantized per token at run time) or a
:class:`W8A8PerTensorLinear` (one activation scale per call: the naive
baseline that outlier channels break).

``SmoothQuant`` first smooths (``slimlm.quant.smoothquant``) every group of
linears fed by a norm, folding ``1 / s`` into the norm, then swaps the same
way. Linears not fed by a norm (o_proj, down_proj) are smoothed too where the
linear producing their input can absorb ``1 / s`` exactly in its rows
(``fold_previous``): v_proj -> o_proj, up_proj -> down_proj (gated MLP),
fc1 -> fc2 (OPT with ReLU, which commutes with a positive scale). Elsewhere
(GPT-2's GELU MLP, fused Phi-3 projections) they get plain W8A8.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from slimlm.calib import BlockContext, StatsSpec, calibrate_blocks
from slimlm.errors import SlimlmError
from slimlm.models.adapters import HeadLayout, get_adapter, head_layout
from slimlm.quant.rtn import check_schemes
from slimlm.quant.smoothquant import (
    fold_into_norm,
    grouped_head_scales,
    scale_columns,
    scale_rows,
    smoothing_scales,
    weight_absmax,
)
from slimlm.targets import Targets, replace_module, select_linears

log = logging.getLogger("slimlm.quant")

ACT_GRANULARITIES = ("token", "tensor")

# consumer linear (block-relative) -> (producer linear whose output rows are its input channels, kind):
# "channels" when the ops between are elementwise and commute with a positive per-channel scale,
# "heads" when attention sits between (scales shared across the query heads of a kv head).
_GATED_MLP = {"self_attn.o_proj": ("self_attn.v_proj", "heads"), "mlp.down_proj": ("mlp.up_proj", "channels")}
PREVIOUS: dict[str, dict[str, tuple[str, str]]] = {
    **{f: _GATED_MLP for f in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3")},
    "opt": {"self_attn.out_proj": ("self_attn.v_proj", "heads"), "fc2": ("fc1", "channels")},
}


def _check_act(act: str) -> None:
    if act not in ACT_GRANULARITIES:
        raise SlimlmError(f"act_granularity {act!r} is not one of {', '.join(ACT_GRANULARITIES)}")


def _check_targets(targets: Targets) -> None:
    if not isinstance(targets, Targets):
        raise SlimlmError(f"targets must be a Targets(...), got {targets!r}")


@dataclass(frozen=True)
class W8A8:
    """int8 per-channel weights x int8 activations quantized at run time, per ``token`` or ``tensor``."""

    act_granularity: str = "token"
    targets: Targets = field(default_factory=Targets)

    def __post_init__(self) -> None:
        _check_act(self.act_granularity)
        _check_targets(self.targets)


@dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant with migration strength ``alpha`` in [0, 1], then W8A8."""

    alpha: float = 0.5
    targets: Targets = field(default_factory=Targets)
    act_granularity: str = "token"
    batch_size: int = 8
    fold_previous: bool = True  # also smooth o_proj/down_proj through the producing linear where exact

    needs_calibration: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise SlimlmError(f"alpha must be in [0, 1] (0.5 in the paper, up to 0.75-0.8 for strong outliers), "
                              f"got {self.alpha}")  # fmt: skip
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise SlimlmError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        _check_act(self.act_granularity)
        _check_targets(self.targets)


def _plan(model: nn.Module, targets: Targets) -> dict[str, nn.Module]:
    from slimlm.nn import W8A8_WEIGHT_SCHEME

    chosen = select_linears(model, targets)
    check_schemes({name: (m, W8A8_WEIGHT_SCHEME) for name, m in chosen.items()})
    return chosen


def _swap(model: nn.Module, plan: dict[str, nn.Module], act: str, desc: str) -> nn.Module:
    from slimlm.nn import W8A8_CLASSES

    cls = W8A8_CLASSES[act]
    for name, module in tqdm(plan.items(), desc=desc, unit="linear", leave=False):
        replace_module(model, name, cls.from_linear(module))
    return model


def apply_w8a8(model: nn.Module, config: W8A8, calib: Tensor | None = None) -> nn.Module:
    return _swap(model, _plan(model, config.targets), config.act_granularity, "W8A8")


def apply_smoothquant(model: nn.Module, config: SmoothQuant, calib: Tensor | None) -> nn.Module:
    if calib is None:
        raise SlimlmError("SmoothQuant needs calibration token ids (N, L) for activation abs-max: pass calib "
                          "(e.g. slimlm.api.calibration_ids(tokenizer)), or use W8A8() without smoothing")  # fmt: skip
    plan = _plan(model, config.targets)
    smooth_model(model, calib, alpha=config.alpha, names=set(plan), fold_previous=config.fold_previous,
                 batch_size=config.batch_size)  # fmt: skip
    return _swap(model, plan, config.act_granularity, "SmoothQuant W8A8")


@torch.no_grad()
def smooth_model(model: nn.Module, calib: Tensor, *, alpha: float = 0.5, names: set[str] | None = None,
                 fold_previous: bool = True, batch_size: int = 8) -> int:  # fmt: skip
    """Smooth the float model in place (its function is unchanged); -> number of linear groups smoothed.

    ``names``: full linear names to smooth the inputs of (default: every decoder-block linear)."""
    names = set(select_linears(model, Targets())) if names is None else names
    adapter = get_adapter(model)
    previous = PREVIOUS.get(adapter.family, {}) if fold_previous else {}
    if adapter.family == "opt" and getattr(model.config, "activation_function", "relu") != "relu":
        previous = {k: v for k, v in previous.items() if v[1] != "channels"}  # fc1's activation would not commute
    layout = head_layout(model.config)
    done = 0

    def on_block(ctx: BlockContext) -> bool:
        nonlocal done
        done += _smooth_block(ctx, names, alpha, previous, layout)
        return False  # exact: the block's outputs are unchanged

    calibrate_blocks(model, calib, on_block=on_block, spec=StatsSpec(absmax=True), batch_size=batch_size,
                     desc="SmoothQuant")  # fmt: skip
    log.info("SmoothQuant (alpha %.2f) smoothed %d linear groups", alpha, done)
    return done


def _smooth_block(ctx: BlockContext, names: set[str], alpha: float, previous: dict[str, tuple[str, str]],
                  layout: HeadLayout) -> int:  # fmt: skip
    from slimlm.nn import linear_weight

    done = 0
    for group in ctx.groups:
        if not any(n in names for n in group.linears):
            continue
        Ws = [linear_weight(m)[0] for m in group.linears.values()]  # views (out, in) of the parameters
        x_absmax = torch.stack([ctx.stats[n].absmax for n in group.linears]).amax(0)  # (in,)
        w_absmax = weight_absmax(Ws)
        if group.norm is not None and getattr(group.norm, "weight", None) is not None:
            s = smoothing_scales(x_absmax, w_absmax, alpha)
            _fold_norm(group.norm, s, ctx.adapter.norm_weight_offset)
        else:
            (name,) = group.linears  # groups without a norm hold one linear
            rel = name[len(ctx.prefix) + 1 :]
            if rel not in previous:
                continue
            producer_rel, kind = previous[rel]
            producer = ctx.block.get_submodule(producer_rel)
            if kind == "heads":
                if hasattr(ctx.block.get_submodule(producer_rel.rpartition(".")[0]), "v_norm"):
                    continue  # a norm on V (Gemma 3n) does not commute with a per-channel scale
                s, s_prev = grouped_head_scales(x_absmax, w_absmax, alpha, n_heads=layout.n_heads,
                                                n_kv_heads=layout.n_kv_heads, head_dim=layout.head_dim)  # fmt: skip
            else:
                s = s_prev = smoothing_scales(x_absmax, w_absmax, alpha)
            _scale_producer(producer, s_prev)
        for W in Ws:
            W.copy_(scale_columns(W, s).to(W.dtype))
        done += 1
    return done


def _fold_norm(norm: nn.Module, s: Tensor, offset: float) -> None:
    bias = getattr(norm, "bias", None)
    w, b = fold_into_norm(norm.weight, bias, s, offset=offset)
    norm.weight.copy_(w.to(norm.weight.dtype))
    if bias is not None:
        bias.copy_(b.to(bias.dtype))


def _scale_producer(linear: nn.Module, s: Tensor) -> None:
    from slimlm.nn import linear_weight

    W, bias = linear_weight(linear)  # (out, in) view
    W_new, b_new = scale_rows(W, bias, s)
    W.copy_(W_new.to(W.dtype))
    if bias is not None:
        bias.data.copy_(b_new.to(bias.dtype))
