"""Configs and handlers of one-shot pruning: magnitude, Wanda, SparseGPT.

Handlers are glue: pick the target linears (:mod:`slimlm.targets`, decoder
blocks by default, ``lm_head`` on request), gather statistics block by block
with :func:`slimlm.calib.runner.calibrate_linears` (squared input norms for Wanda,
Hessians for SparseGPT), call the algorithm, swap in a
:class:`~slimlm.nn.SparseLinear` (or, for SparseGPT's joint mode, a
:class:`~slimlm.nn.SparseQuantLinear`). As in both papers' reference code,
block ``i+1`` is calibrated on the outputs of the already pruned block ``i``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from torch import Tensor, nn

from slimlm.calib.runner import calibrate_linears
from slimlm.calib.stats import LinearStats, StatsSpec
from slimlm.errors import SlimlmError
from slimlm.formats import Scheme, parse_scheme
from slimlm.nn import SparseLinear, SparseQuantLinear, check_schemes, in_features_of, linear_weight
from slimlm.nn.sparse_linear import check_sparse_scheme
from slimlm.prune.magnitude import magnitude_mask, magnitude_scores
from slimlm.prune.masks import SCOPES, topk_keep_global
from slimlm.prune.patterns import NM, Pattern, Unstructured, check_fits, parse_pattern, resolve_sparsity
from slimlm.prune.sparsegpt import sparsegpt_prune
from slimlm.prune.wanda import wanda_mask
from slimlm.targets import Targets, check_targets, float_linears, replace_module
from slimlm.validate import check_bool, check_calib, check_percdamp, check_pos_int

log = logging.getLogger("slimlm.prune")


def nm_pair(pattern: Pattern) -> tuple[int, int] | None:
    """``(n, m)`` of an N:M pattern (how runtime modules record it), None for unstructured."""
    return (pattern.n, pattern.m) if isinstance(pattern, NM) else None


def _common(config: object) -> None:
    """Parse and check the fields every pruning config shares (``sparsity``, ``pattern``, ``targets``)."""
    object.__setattr__(config, "pattern", parse_pattern(config.pattern))
    object.__setattr__(config, "sparsity", resolve_sparsity(config.sparsity, config.pattern))
    check_targets(config.targets)


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

    sparsity: float | None = None
    pattern: Pattern = Unstructured()
    targets: Targets = field(default_factory=Targets)
    batch_size: int = 8
    true_sequential: bool = False  # as SparseGPT's below

    def __post_init__(self) -> None:
        _common(self)
        check_pos_int("batch_size", self.batch_size, "calibration sequences per forward, e.g. 8")
        check_bool("true_sequential", self.true_sequential)


@dataclass(frozen=True)
class SparseGPT:
    """SparseGPT (Frantar & Alistarh 2023): OBS-updated pruning, adaptive mask per lazy block.

    ``scheme`` (an int scheme, e.g. "int4-g64") also rounds the survivors in
    the same pass (joint mode). ``percdamp``: dampening as a fraction of the
    mean Hessian diagonal; ``blocksize``: lazy-block width (the mask is chosen
    per block); ``batch_size``: calibration sequences per forward.
    ``true_sequential``: one forward per block, each group of linears (q/k/v, o_proj, gate/up, down_proj)
    pruned from the inputs the groups pruned before it give (:mod:`slimlm.calib.sequential`, as GPTQ's
    default); off (the paper's walk): every linear from its float block's inputs, then the block is re-run.
    """

    sparsity: float | None = None
    pattern: Pattern = Unstructured()
    scheme: Scheme | None = None
    targets: Targets = field(default_factory=Targets)
    blocksize: int = 128
    percdamp: float = 0.01
    batch_size: int = 8
    true_sequential: bool = False

    def __post_init__(self) -> None:
        _common(self)
        check_bool("true_sequential", self.true_sequential)
        if self.scheme is not None:
            object.__setattr__(self, "scheme", parse_scheme(self.scheme))
            check_sparse_scheme(self.scheme)
        check_pos_int("blocksize", self.blocksize, "lazy-block width, e.g. 128")
        check_pos_int("batch_size", self.batch_size, "calibration sequences per forward, e.g. 8")
        check_percdamp(self.percdamp)


# --- shared glue ------------------------------------------------------------------


def prune_plan(model: nn.Module, targets: Targets, pattern: Pattern) -> dict[str, nn.Module]:
    """The target linears, refused up front if any is already compressed, holds NaN/Inf or does not fit."""
    plan = float_linears(model, targets, action="pruning",
                         compressed_fix="prune before quantizing (a pruned layer can then be quantized with rtn "
                                        "or gptq)")  # fmt: skip
    for name, module in plan.items():
        check_fits(pattern, in_features_of(module), name=name)
    return plan


def swap_sparse(model: nn.Module, name: str, module: nn.Module, keep: Tensor, pattern: Pattern,
                weight: Tensor | None = None) -> None:  # fmt: skip
    """Replace ``name`` by a SparseLinear keeping ``keep`` of ``module``'s (or ``weight``'s) weights."""
    replace_module(model, name, SparseLinear.from_linear(module, keep, nm=nm_pair(pattern), weight=weight))


# --- handlers ---------------------------------------------------------------------


def apply_magnitude(model: nn.Module, config: Magnitude, calib: Tensor | None = None) -> nn.Module:
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
    calib = check_calib(calib, "Wanda")
    plan = prune_plan(model, config.targets, config.pattern)

    def prune(name: str, stats: LinearStats) -> None:
        module = plan[name]
        keep = wanda_mask(linear_weight(module)[0], stats.sq_sum, config.sparsity, config.pattern)
        swap_sparse(model, name, module, keep, config.pattern)

    calibrate_linears(model, calib, plan, prune, spec=StatsSpec(sq_sum=True), batch_size=config.batch_size,
                      desc="Wanda", sequential=config.true_sequential)  # fmt: skip
    return model


def apply_sparsegpt(model: nn.Module, config: SparseGPT, calib: Tensor | None = None) -> nn.Module:
    calib = check_calib(calib, "SparseGPT")
    plan = prune_plan(model, config.targets, config.pattern)
    if config.scheme is not None:  # a group size that does not fit is refused before any layer changes
        check_schemes({name: (m, config.scheme) for name, m in plan.items()})

    def prune(name: str, stats: LinearStats) -> None:
        module = plan[name]
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

    calibrate_linears(model, calib, plan, prune, spec=StatsSpec(hessian=True), batch_size=config.batch_size,
                      desc="SparseGPT", sequential=config.true_sequential)  # fmt: skip
    return model
