"""Handlers of low-rank factorization: choose ranks, whiten, factorize, swap in LowRankLinear.

Plain SVD reads only the weights. ASVD and SVD-LLM walk the blocks with
:func:`slimlm.calib.runner.calibrate_linears`: block ``i`` is factorized from
the statistics of its inputs in the model whose blocks ``< i`` are already
factorized, then re-run (as in SVD-LLM's own pipeline).

``allocation: spectrum`` needs every target's spectrum before the first layer
is cut, while the walk sees one block at a time. It therefore runs a first,
read-only walk that keeps only the singular values (of the uncompressed model's
whitened weights), allocates the ranks globally
(:func:`slimlm.lowrank.ranks.spectrum_ranks`), and then runs the factorizing
walk with those ranks fixed. It costs one more calibration pass and SVD per
layer; the alternative, a budget per block, cannot move parameters between
blocks, which is most of what the allocation buys.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from slimlm.calib.runner import BlockContext, calibrate_blocks, calibrate_linears
from slimlm.calib.stats import LinearStats, StatsSpec
from slimlm.errors import SlimlmError
from slimlm.lowrank.asvd import asvd_whitening
from slimlm.lowrank.config import ASVD, SVD, SVDLLM, LowRank
from slimlm.lowrank.ranks import (Shape, energy_rank, is_dense_cheaper, kept_params, max_uniform_params,
                                  spectrum_ranks, uniform_rank)  # fmt: skip
from slimlm.lowrank.svd_llm import closed_form_update, svd_llm_whitening
from slimlm.models.adapters import get_adapter
from slimlm.models.lazy import lazy_blocks
from slimlm.nn import LowRankLinear, linear_weight
from slimlm.solvers.lowrank import Spectrum, Whitening, spectrum
from slimlm.targets import float_linears, replace_module
from slimlm.validate import check_calib

log = logging.getLogger("slimlm.lowrank")

Whiten = Callable[[LowRank, LinearStats], Whitening]
# config type -> (statistics its whitening needs, the whitening); plain SVD needs none
WHITENING: dict[type, tuple[StatsSpec, Whiten]] = {
    ASVD: (StatsSpec(sq_sum=True), lambda c, st: asvd_whitening(st, c.alpha)),
    SVDLLM: (StatsSpec(hessian=True), lambda c, st: svd_llm_whitening(st, c.damp)),
}


def needs_calibration(config: LowRank) -> bool:
    return type(config) in WHITENING


def lowrank_plan(model: nn.Module, config: LowRank) -> dict[str, nn.Module]:
    """The target linears, refused up front if any is already compressed or holds NaN/Inf."""
    return float_linears(model, config.targets, action="factorizing",
                         compressed_fix="factorize float linears: put the low-rank step first in the recipe")


def fixed_ranks(config: LowRank, shapes: dict[str, Shape]) -> dict[str, int | None] | None:
    """Ranks that depend only on shapes (``rank``, uniform ``params``); None when spectra decide them."""
    if config.rank is not None:
        name, (m, n) = min(shapes.items(), key=lambda kv: min(kv[1]))
        if config.rank > min(m, n):
            raise SlimlmError(f"rank {config.rank} exceeds min(in, out) = {min(m, n)} of {name} ({m}x{n}); give "
                              f"rank <= {min(m, n)}")  # fmt: skip
        return dict.fromkeys(shapes, config.rank)
    if config.params is None or config.allocation != "uniform":
        return None
    ranks = {name: uniform_rank(shape, config.params) for name, shape in shapes.items()}
    zero = [name for name, r in ranks.items() if r < 1]
    if zero:
        m, n = shapes[zero[0]]
        raise SlimlmError(f"params {config.params} removes everything from {zero[0]} ({m}x{n}: rank 0); the largest "
                          f"params that keeps rank 1 in every target is {max_uniform_params(shapes):.4f}")  # fmt: skip
    return ranks


def _choose(config: LowRank, name: str, shape: Shape, sp: Spectrum, ranks: dict[str, int | None] | None) -> int | None:
    """The rank of ``name``; None leaves it dense (its rank would hold as many weights as the matrix)."""
    rank = ranks[name] if ranks is not None else energy_rank(sp.s, config.energy)
    if rank is None:  # spectrum allocation chose the dense matrix
        return None
    if not is_dense_cheaper(shape, rank):
        return rank
    if config.rank is not None:
        log.warning("%s: rank %d holds %d weights, more than the dense %dx%d", name, rank,
                    kept_params(shape, rank), *shape)  # fmt: skip
        return rank
    log.info("%s: rank %d is past break-even for %dx%d; left dense", name, rank, *shape)
    return None


def _factorize(model: nn.Module, name: str, module: nn.Module, rank: int | None, whitening: Whitening, *,
               gram: Tensor | None = None) -> None:  # fmt: skip
    """Swap ``name`` for its best rank-``rank`` LowRankLinear under ``whitening`` (None: leave it); with
    ``gram`` (the inputs' Gram matrix) the output factor is then refit on it (SVD-LLM's update)."""
    if rank is None:
        return
    W, bias = linear_weight(module)  # (out, in), also for GPT-2's Conv1D
    A, B = spectrum(W, whitening).factors(rank, dtype=torch.float64)  # (rank, in), (out, rank)
    if gram is not None:
        B = closed_form_update(W, A, gram)
    replace_module(model, name, LowRankLinear.from_factors(A.to(W.dtype), B.to(W.dtype), bias))


class _Walk:
    """What one factorization pass keeps: the plan, the ranks, the chosen ranks and the last whitening."""

    def __init__(self, model: nn.Module, config: LowRank, plan: dict[str, nn.Module],
                 ranks: dict[str, int | None] | None) -> None:  # fmt: skip
        self.model, self.config, self.plan, self.ranks = model, config, plan, ranks
        self.shapes = {name: tuple(linear_weight(m)[0].shape) for name, m in plan.items()}
        self.chosen: dict[str, int | None] = {}
        self._last: tuple[int, Whitening] | None = None  # linears of one group share their stats

    def whitening(self, stats: LinearStats | None) -> Whitening:
        if stats is None:
            return Whitening()
        if self._last is None or self._last[0] != id(stats):
            self._last = (id(stats), WHITENING[type(self.config)][1](self.config, stats))
        return self._last[1]

    def spectrum_of(self, name: str, stats: LinearStats | None) -> Spectrum:
        return spectrum(linear_weight(self.plan[name])[0], self.whitening(stats))

    def fix(self, name: str, stats: LinearStats | None) -> None:
        white = self.whitening(stats)
        if self.ranks is None:  # energy: the rank comes from this layer's spectrum
            sp = spectrum(linear_weight(self.plan[name])[0], white)
            rank = _choose(self.config, name, self.shapes[name], sp, None)
        else:
            rank = _choose(self.config, name, self.shapes[name], None, self.ranks)
        self.chosen[name] = rank
        gram = stats.H if stats is not None and getattr(self.config, "update", False) else None
        _factorize(self.model, name, self.plan[name], rank, white, gram=gram)


def _spectra(walk: _Walk, calib: Tensor | None) -> dict[str, Tensor]:
    """Every target's (whitened) singular values, from a read-only pass when whitening needs statistics."""
    if calib is None:
        return {name: walk.spectrum_of(name, None).s for name in walk.plan}
    found: dict[str, Tensor] = {}

    def on_block(ctx: BlockContext) -> bool:
        for name in (n for n in ctx.linears if n in walk.plan):
            found[name] = walk.spectrum_of(name, ctx.stats[name]).s.cpu()
        return False  # nothing changed: the runner need not re-run the block

    spec = WHITENING[type(walk.config)][0]
    calibrate_blocks(walk.model, calib, on_block=on_block, spec=spec, batch_size=walk.config.batch_size,
                     desc="low-rank spectra")  # fmt: skip
    missing = [n for n in walk.plan if n not in found]
    if missing:
        raise SlimlmError(f"spectrum allocation sees the decoder blocks' linears only, not {missing[0]}; use "
                          "allocation: uniform to factorize it")  # fmt: skip
    return found


def apply_lowrank(model: nn.Module, config: LowRank, calib: Tensor | None = None) -> nn.Module:
    """Factorize the target linears of ``model`` (in place) as ``config`` (SVD, ASVD or SVDLLM) says."""
    if type(config) not in (SVD, ASVD, SVDLLM):
        raise SlimlmError(f"expected SVD, ASVD or SVDLLM, got {type(config).__name__}")
    t0 = time.perf_counter()
    calibrated = needs_calibration(config)
    if calibrated:
        calib = check_calib(calib, type(config).__name__, purpose="to whiten each layer by its inputs")
    plan = lowrank_plan(model, config)
    walk = _Walk(model, config, plan, None)
    walk.ranks = fixed_ranks(config, walk.shapes)
    if walk.ranks is None and config.params is not None:  # allocation: spectrum
        walk.ranks = spectrum_ranks(_spectra(walk, calib if calibrated else None), walk.shapes, config.params)
    if calibrated:
        spec = WHITENING[type(config)][0]
        calibrate_linears(model, calib, plan, walk.fix, spec=spec, batch_size=config.batch_size,
                          desc=type(config).__name__)  # fmt: skip
    else:
        _fix_uncalibrated(model, walk)
    _log_summary(config, walk, time.perf_counter() - t0)
    return model


def _fix_uncalibrated(model: nn.Module, walk: _Walk) -> None:
    """Plain SVD: every target from its weight alone; on a lazily loaded model one block in memory at a time
    (each block read, factorized and handed to the sink; the result is the same either way)."""
    lazy = lazy_blocks(model)
    if lazy is None:
        for name in walk.plan:
            walk.fix(name, None)
        return
    prefix = get_adapter(model).blocks + "."
    for i in range(len(lazy)):
        lazy.materialize(i)
        for name in [n for n in walk.plan if n.startswith(f"{prefix}{i}.")]:
            walk.fix(name, None)
        lazy.release(i)
    for name in [n for n in walk.plan if not n.startswith(prefix)]:  # lm_head: already in memory
        walk.fix(name, None)


def _log_summary(config: LowRank, walk: _Walk, seconds: float) -> None:
    dense = sum(m * n for m, n in walk.shapes.values())
    kept = sum(kept_params(walk.shapes[n], r) for n, r in walk.chosen.items())
    left = sum(r is None for r in walk.chosen.values())
    log.info("%s: %d linears, %.1f%% of their %s weights removed (%d left dense), %.1fs", type(config).__name__,
             len(walk.chosen), 100 * (1 - kept / dense), f"{dense:,}", left, seconds)  # fmt: skip
