"""AWQ config and handler: search per-channel scales block by block, fold them, clip, quantize.

For each group of linears that read one input (the adapter's groups), the
scale ``s`` found by :func:`slimlm.quant.awq.awq_search_scale` multiplies the
linears' input columns and ``1/s`` is folded exactly into the op that
produces the input: the norm's weight (and bias), or the rows of the linear
whose output it is (the adapter's ``producers``: ``v_proj`` for ``o_proj``
when there is no GQA, ``up_proj`` for ``down_proj`` since ``act(gate) * up``
is elementwise, OPT's ``fc1`` through ReLU; see :mod:`slimlm.quant.fold`).
The float model computes the same function after the folding; only then
are the block's linears clipped, quantized and swapped for QuantLinear. The
algorithm itself is in :mod:`slimlm.quant.awq`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from slimlm.calib.runner import BlockContext, Group, calibrate_blocks
from slimlm.calib.stats import StatsSpec
from slimlm.errors import SlimlmError
from slimlm.formats import IntScheme, PerGroup, Scheme, parse_scheme, quantize
from slimlm.nn import QuantLinear, check_schemes, in_features_of, linear_weight, share_embedding
from slimlm.quant.awq import awq_clip_quantize, awq_search_scale
from slimlm.quant.fold import divide_outputs, fold_norm, producing_linear, scale_inputs
from slimlm.targets import Targets, check_targets, replace_module, scheme_plan, shared_head
from slimlm.validate import check_bool, check_calib, check_pos_int

log = logging.getLogger("slimlm.quant")


@dataclass(frozen=True)
class AWQ:
    """Activation-aware weight quantization (Lin et al. 2023) to ``scheme``.

    ``grid``: alphas tried in [0, 1) (and range-shrink steps of the clipping
    search); ``clip_search``: search each (row, group) range (IntScheme only),
    skipping ``clip_exclude`` globs (q/k, whose errors the attention product
    amplifies, as in the reference); ``n_sample_rows``: calibration tokens kept
    per linear to measure mean |x|; ``quantize=False`` folds the scales and
    leaves the weights in float (for a later quantizer such as GPTQ). The
    head, outside the blocks, has no statistics: it is rounded plainly, in
    ``targets.lm_head``'s scheme when it names one.
    """

    scheme: Scheme = IntScheme(bits=4, granularity=PerGroup(64))
    targets: Targets = field(default_factory=Targets)
    grid: int = 20
    clip_search: bool = True
    max_shrink: float = 0.5
    clip_exclude: tuple[str, ...] = ("*.q_proj", "*.k_proj")
    n_sample_rows: int = 4096
    batch_size: int = 8
    quantize: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", parse_scheme(self.scheme))
        object.__setattr__(self, "clip_exclude", tuple(self.clip_exclude))
        check_targets(self.targets, head_scheme=True)
        if (self.targets.head_scheme is not None or self.targets.embedding == "shared") and not self.quantize:
            raise SlimlmError("lm_head names a scheme or embedding: shared is set but quantize is false (AWQ only "
                              "folds scales): set quantize: true, or quantize lm_head in the later step")  # fmt: skip
        check_pos_int("grid", self.grid, "alphas tried, the paper uses 20")
        check_pos_int("n_sample_rows", self.n_sample_rows, "calibration tokens kept per linear, e.g. 4096")
        check_pos_int("batch_size", self.batch_size, "calibration sequences per forward, e.g. 8")
        check_bool("clip_search", self.clip_search)
        check_bool("quantize", self.quantize)
        if not isinstance(self.max_shrink, (int, float)) or not 0.0 < self.max_shrink < 1.0:
            raise SlimlmError(f"max_shrink must be in (0, 1) (the paper uses 0.5), got {self.max_shrink!r}")
        if self.clip_search and not isinstance(self.scheme, IntScheme):
            raise SlimlmError(f"clip_search needs an IntScheme, got {self.scheme!r}; set clip_search=False")


# --- where 1/s goes ------------------------------------------------------------


def _is_float_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))  # Conv1D: GPT-2, weight (in, out)


def folder(ctx: BlockContext, group: Group):
    """A function folding ``1/s`` into the op producing ``group``'s input, or None when that is not exact."""
    if not all(_is_float_linear(m) for m in group.linears.values()):
        return None
    if group.norm is not None:
        if getattr(group.norm, "weight", None) is None:
            return None
        return lambda s: fold_norm(group.norm, s, offset=ctx.adapter.norm_weight_offset)
    rels = [name[len(ctx.prefix) + 1 :] for name in group.linears]
    found = producing_linear(ctx.block, ctx.adapter, rels[0]) if len(rels) == 1 else None
    if found is None:
        return None
    prev, producer = found
    n_in = in_features_of(next(iter(group.linears.values())))
    if not _is_float_linear(prev) or linear_weight(prev)[0].shape[0] != producer.parts * n_in:
        return None  # e.g. GQA: v_proj has fewer outputs than o_proj has inputs
    return lambda s: divide_outputs(prev, s)


# --- the block pass -------------------------------------------------------------


def _search_and_fold(ctx: BlockContext, plan: dict[str, nn.Module], config: AWQ) -> dict[str, Tensor]:
    """Search and fold the scale of every group with targets; returns full name -> s for scaled linears."""
    scales: dict[str, Tensor] = {}
    for group in ctx.groups:
        names = [n for n in group.linears if n in plan]
        fold = folder(ctx, group) if names else None
        if fold is None:
            continue
        stats = ctx.stats[names[0]]  # every linear of the group reads the same input
        s_x = stats.sample_rows().abs().mean(0)  # (in,) mean |x| per channel
        Ws = [_weight(plan[n]) for n in names]
        s, alpha, errors = awq_search_scale(Ws, stats.H, s_x.to(stats.H.device), config.scheme, grid=config.grid)
        log.debug("%s: alpha %.2f, output error %.4g (RTN %.4g)", names, alpha, min(errors), errors[0])
        if alpha == 0.0:
            continue  # s == 1
        fold(s)
        for name, linear in group.linears.items():
            scale_inputs(linear, s)
            scales[name] = s
    return scales


def _weight(linear: nn.Module) -> Tensor:
    """The weight as (out, in) float32."""
    return linear_weight(linear)[0].float()


def _quantize_block(ctx: BlockContext, plan: dict[str, nn.Module], config: AWQ, scales: dict[str, Tensor]) -> None:
    for name, linear in ctx.linears.items():
        if name not in plan:
            continue
        if config.clip_search and not any(fnmatchcase(name, p) for p in config.clip_exclude):
            H = ctx.stats[name].H
            if name in scales:  # the inputs are now X / s: Gram diag(1/s) H diag(1/s)
                inv = 1.0 / scales[name]
                H = H * inv[:, None] * inv[None, :]
            qw = awq_clip_quantize(_weight(linear), H, config.scheme, grid=config.grid, max_shrink=config.max_shrink)
        else:
            qw = quantize(_weight(linear), config.scheme)
        rel = name[len(ctx.prefix) + 1 :]  # block-relative
        replace_module(ctx.block, rel, QuantLinear.from_linear(linear, config.scheme, qweight=qw))


def apply_awq(model: nn.Module, config: AWQ, calib: Tensor | None = None) -> nn.Module:
    """Search, fold, clip and quantize block by block on calibration token ids ``calib`` (N, L)."""
    calib = check_calib(calib, "AWQ", purpose="(or use RTN)")
    schemes = scheme_plan(model, config.targets, lambda name: config.scheme)
    check_schemes(schemes)  # refuses an already quantized layer
    plan = {name: m for name, (m, _) in schemes.items()}
    for module in plan.values():
        linear_weight(module)  # refuses an already compressed (e.g. pruned) layer in one line
    shared = shared_head(model, config.targets, schemes)
    seen: set[str] = set()

    def on_block(ctx: BlockContext) -> bool:
        scales = _search_and_fold(ctx, plan, config)
        seen.update(ctx.linears)
        if not config.quantize:
            return False  # the float function is unchanged
        _quantize_block(ctx, plan, config, scales)
        return True

    spec = StatsSpec(hessian=True, keep_rows=config.n_sample_rows)
    calibrate_blocks(model, calib, on_block=on_block, spec=spec, batch_size=config.batch_size, desc="AWQ")
    for name in plan.keys() - seen:  # outside the decoder blocks (lm_head): no statistics, plain rounding
        if config.quantize:
            log.info("AWQ: %s is outside the decoder blocks; quantized by plain rounding", name)
            replace_module(model, name, QuantLinear.from_linear(plan[name], schemes[name][1]))
    if shared is not None:
        share_embedding(model, *shared)
    return model
