"""GPTQ config and handler: gather each block's Hessians, quantize its linears, swap in QuantLinear.

The algorithm is :func:`slimlm.quant.gptq.gptq_quantize`. As in the paper's
reference code with "true sequential" off, every linear of a block is
quantized from the Hessian of its inputs in the (already quantized) model
up to that block; the block is then re-run so block ``i+1`` calibrates on
the quantized model's activations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from slimlm.calib import BlockContext, LinearStats, StatsSpec, calibrate_blocks
from slimlm.errors import SlimlmError
from slimlm.formats import IntScheme, PerGroup, Scheme, parse_scheme
from slimlm.quant.gptq import check_gptq_scheme, gptq_quantize
from slimlm.quant.rtn import check_schemes
from slimlm.targets import Targets, match_override, replace_module, select_linears

log = logging.getLogger("slimlm.quant")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise SlimlmError(f"{name} must be true or false, got {value!r}")


def _check_pos_int(name: str, value: object, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SlimlmError(f"{name} must be a positive int ({hint}), got {value!r}")


@dataclass(frozen=True)
class GPTQ:
    """Quantize weights to ``scheme`` (IntScheme or TernaryScheme) with GPTQ.

    ``act_order`` solves columns by decreasing input energy; ``static_groups``
    fixes group parameters from the float weights first (groups stay
    contiguous either way). ``percdamp`` is the dampening as a fraction of
    the mean Hessian diagonal; ``blocksize`` the lazy-update width;
    ``batch_size`` the calibration mini-batch. ``overrides`` as in RTN.
    """

    needs_calibration: ClassVar[bool] = True

    scheme: Scheme = IntScheme(bits=4, granularity=PerGroup(64))
    targets: Targets = field(default_factory=Targets)
    overrides: tuple[tuple[str, Scheme], ...] = ()
    act_order: bool = True
    static_groups: bool = True
    percdamp: float = 0.01
    blocksize: int = 128
    batch_size: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", parse_scheme(self.scheme))
        object.__setattr__(self, "overrides", tuple((str(p), parse_scheme(s)) for p, s in self.overrides))
        for s in (self.scheme, *(s for _, s in self.overrides)):
            check_gptq_scheme(s)
        if not isinstance(self.targets, Targets):
            raise SlimlmError(f"targets must be a Targets(...), got {self.targets!r}")
        _check_bool("act_order", self.act_order)
        _check_bool("static_groups", self.static_groups)
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float)) \
                or not 0.0 <= self.percdamp <= 1.0:  # fmt: skip
            raise SlimlmError(f"percdamp must be a number in [0, 1] (the paper uses 0.01), got {self.percdamp!r}")
        _check_pos_int("blocksize", self.blocksize, "lazy-update width, e.g. 128")
        _check_pos_int("batch_size", self.batch_size, "calibration sequences per forward, e.g. 8")

    def scheme_for(self, name: str) -> Scheme:
        return match_override(name, self.overrides) or self.scheme


def _quantize_into(model: nn.Module, name: str, module: nn.Module, scheme: Scheme, H: Tensor, config: GPTQ) -> None:
    from slimlm.nn import QuantLinear, SparseLinear
    from slimlm.nn.quant_linear import linear_weight

    if isinstance(module, SparseLinear):  # pruned earlier: GPTQ's updates would fill its zeros; keep the mask
        from slimlm.prune.compose import gptq_pruned

        new = gptq_pruned(module, H, scheme, blocksize=config.blocksize, percdamp=config.percdamp,
                          act_order=config.act_order, static_groups=config.static_groups)  # fmt: skip
        replace_module(model, name, new)
        return
    W, _ = linear_weight(module)  # (out, in), also for GPT-2's Conv1D (stored (in, out))
    qweight, stats = gptq_quantize(W, H.to(W.device), scheme, blocksize=config.blocksize, percdamp=config.percdamp,
                                   act_order=config.act_order, static_groups=config.static_groups)  # fmt: skip
    log.debug("gptq %s: loss %.4g, damp %.3g, %d dead inputs, %.2fs", name, stats["loss"], stats["damp"],
              stats["dead"], stats["seconds"])  # fmt: skip
    replace_module(model, name, QuantLinear.from_linear(module, scheme, qweight=qweight))


@torch.no_grad()
def _lm_head_hessian(model: nn.Module, head: nn.Module, calib: Tensor, batch_size: int) -> Tensor:
    """H of the head's inputs: one more forward of the (block-quantized) model over ``calib``."""
    stats = LinearStats(in_features=head.weight.shape[1], spec=StatsSpec(hessian=True))
    handle = head.register_forward_pre_hook(lambda _m, args: stats.add(args[0]))
    device = head.weight.device
    try:
        for start in range(0, calib.shape[0], batch_size):
            model(input_ids=calib[start : start + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    return stats.H


def apply_gptq(model: nn.Module, config: GPTQ, calib: Tensor | None = None) -> nn.Module:
    if calib is None:
        raise SlimlmError("GPTQ needs calibration token ids (N, L); pass calib=calibration_batch(...) "
                          "or use a recipe through `slimlm compress`, which provides them")  # fmt: skip
    if not isinstance(calib, Tensor) or calib.dim() != 2 or calib.numel() == 0:
        raise SlimlmError(f"calib must be a non-empty (N, L) tensor of token ids, got {type(calib).__name__}")
    plan = {name: (m, config.scheme_for(name)) for name, m in select_linears(model, config.targets).items()}
    check_schemes(plan)
    done: set[str] = set()

    def on_block(ctx: BlockContext) -> bool:
        mine = [n for n in ctx.linears if n in plan]
        for name in mine:
            module, scheme = plan[name]
            _quantize_into(model, name, module, scheme, ctx.stats[name].H, config)
            done.add(name)
        return bool(mine)

    calibrate_blocks(model, calib, on_block=on_block, spec=StatsSpec(hessian=True), batch_size=config.batch_size,
                     desc="GPTQ")  # fmt: skip
    for name in [n for n in plan if n not in done]:  # outside the blocks: lm_head
        module, scheme = plan[name]
        _quantize_into(model, name, module, scheme, _lm_head_hessian(model, module, calib, config.batch_size), config)
    return model

