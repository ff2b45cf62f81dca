"""Configs and handlers of one-shot pruning: magnitude, Wanda, SparseGPT.

Handlers are glue: pick the target linears (:mod:`slimlm.targets`, decoder
blocks by default, ``lm_head`` on request), gather statistics block by block
with :func:`slimlm.calib.calibrate_blocks` (squared input norms for Wanda,
Hessians for SparseGPT), call the algorithm, swap in a
:class:`~slimlm.nn.SparseLinear` (or, for SparseGPT's joint mode, a
:class:`~slimlm.nn.SparseQuantLinear`). As in both papers' reference code,
block ``i+1`` is calibrated on the outputs of the already pruned block ``i``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

from slimlm.calib import BlockContext, LinearStats, StatsSpec, calibrate_blocks
from slimlm.errors import SlimlmError
from slimlm.formats import Scheme, parse_scheme
from slimlm.prune.magnitude import magnitude_mask, magnitude_scores
from slimlm.prune.masks import SCOPES, topk_keep_global
from slimlm.prune.patterns import NM, Pattern, Unstructured, check_fits, parse_pattern, resolve_sparsity
from slimlm.prune.sparsegpt import sparsegpt_prune
from slimlm.prune.wanda import wanda_mask
from slimlm.targets import Targets, replace_module, select_linears

log = logging.getLogger("slimlm.prune")


def nm_pair(pattern: Pattern) -> tuple[int, int] | None:
    """``(n, m)`` of an N:M pattern (how runtime modules record it), None for unstructured."""
    return (pattern.n, pattern.m) if isinstance(pattern, NM) else None


def _common(config: object) -> None:
    """Parse and check the fields every pruning config shares (``sparsity``, ``pattern``, ``targets``)."""
    object.__setattr__(config, "pattern", parse_pattern(config.pattern))
    object.__setattr__(config, "sparsity", resolve_sparsity(config.sparsity, config.pattern))
    if not isinstance(config.targets, Targets):
        raise SlimlmError(f"targets must be a Targets(...), got {config.targets!r}")


def _check_pos_int(name: str, value: object, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SlimlmError(f"{name} must be a positive int ({hint}), got {value!r}")


@dataclass(frozen=True)
class Magnitude:
    """Prune the smallest ``|W|``: ``sparsity`` (default 0.5) per ``scope`` ("row", "layer" or
    "global" across all targets), or an N:M ``pattern`` (e.g. "2:4"; sparsity implied)."""

    sparsity: float | None = None
    pattern: Pattern = Unstructured()
    scope: str = "layer"
    targets: Targets = field(default_factory=Targets)

    def __post_init__(self) -> None:
        _common(self)
        if self.scope not in (*SCOPES, "global"):
            raise SlimlmError(f"scope must be one of {', '.join((*SCOPES, 'global'))}, got {self.scope!r}")


@dataclass(frozen=True)
class Wanda:
    """Wanda (Sun et al. 2023): prune the lowest ``|W| * ||x||`` per output row, or N:M."""

    needs_calibration: ClassVar[bool] = True

    sparsity: float | None = None
    pattern: Pattern = Unstructured()
    targets: Targets = field(default_factory=Targets)
    batch_size: int = 8

    def __post_init__(self) -> None:
        _common(self)
        _check_pos_int("batch_size", self.batch_size, "calibration sequences per forward, e.g. 8")


@dataclass(frozen=True)
class SparseGPT:
    """SparseGPT (Frantar & Alistarh 2023): OBS-updated pruning, adaptive mask per lazy block.

    ``scheme`` (an int scheme, e.g. "int4-g64") also rounds the survivors in
    the same pass (joint mode). ``percdamp``: dampening as a fraction of the
    mean Hessian diagonal; ``blocksize``: lazy-block width (the mask is chosen
    per block); ``batch_size``: calibration sequences per forward.
    """

    needs_calibration: ClassVar[bool] = True

    sparsity: float | None = None
    pattern: Pattern = Unstructured()
    scheme: Scheme | None = None
    targets: Targets = field(default_factory=Targets)
    blocksize: int = 128
    percdamp: float = 0.01
    batch_size: int = 8

    def __post_init__(self) -> None:
        _common(self)
        if self.scheme is not None:
            from slimlm.nn.sparse_linear import check_sparse_scheme

            object.__setattr__(self, "scheme", parse_scheme(self.scheme))
            check_sparse_scheme(self.scheme)
        _check_pos_int("blocksize", self.blocksize, "lazy-block width, e.g. 128")
        _check_pos_int("batch_size", self.batch_size, "calibration sequences per forward, e.g. 8")
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float)) \
                or not 0.0 <= self.percdamp <= 1.0:  # fmt: skip
            raise SlimlmError(f"percdamp must be a number in [0, 1] (the paper uses 0.01), got {self.percdamp!r}")


# --- shared glue ------------------------------------------------------------------


def prune_plan(model: nn.Module, targets: Targets, pattern: Pattern) -> dict[str, nn.Module]:
    """The target linears, refused up front if any is already compressed, holds NaN/Inf or does not fit."""
    from slimlm.nn import linear_weight

    plan = select_linears(model, targets)
    for name, module in plan.items():
        try:
            W, _ = linear_weight(module)
        except SlimlmError:
            raise SlimlmError(f"{name} is already a {type(module).__name__}; prune before quantizing "
                              "(a pruned layer can then be quantized with rtn or gptq)") from None  # fmt: skip
        if not torch.isfinite(W).all():
            raise SlimlmError(f"{name} holds NaN/Inf weight(s); fix or reload the model before pruning")
        check_fits(pattern, W.shape[1], name=name)
    return plan


def swap_sparse(model: nn.Module, name: str, module: nn.Module, keep: Tensor, pattern: Pattern,
                weight: Tensor | None = None) -> None:  # fmt: skip
    """Replace ``name`` by a SparseLinear keeping ``keep`` of ``module``'s (or ``weight``'s) weights."""
    from slimlm.nn import SparseLinear

    replace_module(model, name, SparseLinear.from_linear(module, keep, nm=nm_pair(pattern), weight=weight))


def _check_calib(calib: Tensor | None, method: str) -> None:
    if calib is None:
        raise SlimlmError(f"{method} needs calibration token ids (N, L); pass calib=calibration_ids(...) "
                          "or use a recipe through `slimlm compress`, which provides them")  # fmt: skip
    if not isinstance(calib, Tensor) or calib.dim() != 2 or calib.numel() == 0:
        raise SlimlmError(f"calib must be a non-empty (N, L) tensor of token ids, got {type(calib).__name__}")


@torch.no_grad()
def head_stats(model: nn.Module, head: nn.Module, calib: Tensor, spec: StatsSpec, batch_size: int) -> LinearStats:
    """Statistics of ``head``'s inputs (lm_head lies outside the blocks): one more forward over ``calib``."""
    stats = LinearStats(in_features=head.in_features, spec=spec)
    handle = head.register_forward_pre_hook(lambda _m, args: stats.add(args[0]))
    device = next(model.parameters()).device
    try:
        for start in range(0, calib.shape[0], batch_size):
            model(input_ids=calib[start : start + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    return stats


def _calibrated(model: nn.Module, plan: dict[str, nn.Module], calib: Tensor, spec: StatsSpec, batch_size: int,
                prune: Callable[[str, nn.Module, LinearStats], None], desc: str) -> None:  # fmt: skip
    """Run ``prune(name, module, stats)`` on every planned linear, block by block, then lm_head."""
    done: set[str] = set()

    def on_block(ctx: BlockContext) -> bool:
        mine = [n for n in ctx.linears if n in plan]
        for name in mine:
            prune(name, plan[name], ctx.stats[name])
            done.add(name)
        return bool(mine)

    calibrate_blocks(model, calib, on_block=on_block, spec=spec, batch_size=batch_size, desc=desc)
    for name in [n for n in plan if n not in done]:  # outside the blocks: lm_head
        prune(name, plan[name], head_stats(model, plan[name], calib, spec, batch_size))


# --- handlers ---------------------------------------------------------------------


def apply_magnitude(model: nn.Module, config: Magnitude, calib: Tensor | None = None) -> nn.Module:
    from slimlm.nn import linear_weight

    t0 = time.perf_counter()
    plan = prune_plan(model, config.targets, config.pattern)
    weights = {name: linear_weight(m)[0] for name, m in plan.items()}
    if config.scope == "global" and not isinstance(config.pattern, NM):
        keeps = dict(zip(weights, topk_keep_global([magnitude_scores(W) for W in weights.values()], config.sparsity)))
    else:
        keeps = {n: magnitude_mask(W, config.sparsity, config.pattern, scope=config.scope) for n, W in weights.items()}
    for name, module in plan.items():
        swap_sparse(model, name, module, keeps[name], config.pattern)
    log.info("magnitude %s %s: %d linears in %.1fs", config.pattern, f"{config.sparsity:.0%}", len(plan),
             time.perf_counter() - t0)  # fmt: skip
    return model


def apply_wanda(model: nn.Module, config: Wanda, calib: Tensor | None = None) -> nn.Module:
    from slimlm.nn import linear_weight

    _check_calib(calib, "Wanda")
    plan = prune_plan(model, config.targets, config.pattern)

    def prune(name: str, module: nn.Module, stats: LinearStats) -> None:
        keep = wanda_mask(linear_weight(module)[0], stats.sq_sum, config.sparsity, config.pattern)
        swap_sparse(model, name, module, keep, config.pattern)

    _calibrated(model, plan, calib, StatsSpec(sq_sum=True), config.batch_size, prune, "Wanda")
    return model


def apply_sparsegpt(model: nn.Module, config: SparseGPT, calib: Tensor | None = None) -> nn.Module:
    from slimlm.nn import SparseQuantLinear, linear_weight

    _check_calib(calib, "SparseGPT")
    plan = prune_plan(model, config.targets, config.pattern)
    if config.scheme is not None:  # a group size that does not fit is refused before any layer changes
        from slimlm.quant.rtn import check_schemes

        check_schemes({name: (m, config.scheme) for name, m in plan.items()})

    def prune(name: str, module: nn.Module, stats: LinearStats) -> None:
        W, _ = linear_weight(module)
        res = sparsegpt_prune(W, stats.H, config.sparsity, config.pattern, scheme=config.scheme,
                              blocksize=config.blocksize, percdamp=config.percdamp)  # fmt: skip
        log.debug("sparsegpt %s: loss %.4g, damp %.3g, %d dead inputs, %.2fs", name, res.stats["loss"],
                  res.stats["damp"], res.stats["dead"], res.stats["seconds"])  # fmt: skip
        if res.qweight is None:
            swap_sparse(model, name, module, res.keep, config.pattern, weight=res.weight)
        else:
            replace_module(model, name, SparseQuantLinear.from_quantized(module, res.qweight, res.keep,
                                                                         nm=nm_pair(config.pattern)))  # fmt: skip

    _calibrated(model, plan, calib, StatsSpec(hessian=True), config.batch_size, prune, "SparseGPT")
    return model
