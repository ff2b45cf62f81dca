"""SparseGPT: one-shot pruning with Optimal Brain Surgeon weight updates.

Frantar & Alistarh. "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot", ICML 2023 (arXiv:2301.00774), Algorithm 1.

For one linear with weight ``W (out, in)`` and ``H = 2/n X^T X`` SparseGPT
minimises ``||W X - W' X||^2`` over ``W'`` with the sparsity pattern, one
input column at a time, with the same column loop as GPTQ
(:func:`slimlm.solvers.obs_solve`, ``U`` the upper Cholesky factor of
``H^-1``): fixing column ``j`` zeroes its pruned entries and spreads the
error over the columns not yet fixed. Pieces of the paper kept here:

* adaptive mask selection: the mask of each lazy block of ``B`` columns is
  chosen when the solver reaches it, from the block's *updated* weights,
  pruning the lowest OBS saliencies ``w^2 / [U]_jj^2`` of the ``out x B``
  block (so the mask follows the compensation already applied); the count
  pruned per block is set so that each matrix loses exactly
  ``n_pruned(out * in, sparsity)`` weights;
* N:M: every ``M`` columns the ``N`` kept weights of each row are chosen
  from the live values of those ``M`` columns (``LazyBlock.current``: they
  may straddle a lazy block);
* joint sparsity + quantization: the surviving weights of each column are
  rounded to an int scheme with GPTQ's grid (:func:`slimlm.solvers.column_grid`,
  static group parameters computed before the solve), so pruning and
  rounding errors are compensated in one pass;
* a fixed mask (``keep=``): only the weight update and rounding run
  (:func:`slimlm.solvers.solve_with_mask`); this is how a GPTQ step on an
  already pruned layer keeps its zeros (GPTQ alone would fill them in with
  its updates).
* dead inputs and dampening as in GPTQ (:func:`slimlm.solvers.prepare`).

The masked solve and the joint rounding are shared in
:mod:`slimlm.solvers.masked`; this file is the mask choice.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.errors import SlimlmError
from slimlm.formats import IntScheme
from slimlm.prune.masks import nm_keep, prune_lowest
from slimlm.prune.patterns import NM, Pattern, check_fits, n_pruned
from slimlm.solvers import (ColumnGrid, LazyBlock, MaskedColumns, ObsProblem, SparseResult, check_layer,
                            masked_solve, solve_with_mask)

__all__ = ["SparseResult", "sparsegpt_prune"]


class _Pruner(MaskedColumns):
    """SparseGPT's adaptive mask, chosen in solve order as the solver reaches each lazy block or N:M group."""

    def __init__(self, W: Tensor, sparsity: float, pattern: Pattern, grid: ColumnGrid | None) -> None:
        super().__init__(torch.ones_like(W, dtype=torch.bool), grid)
        self.n_out, self.n_in = W.shape
        self.sparsity, self.pattern = sparsity, pattern

    def on_block(self, block: LazyBlock) -> None:
        super().on_block(block)
        if not isinstance(self.pattern, NM):
            d = block.Hinv1.diagonal()  # (B,)
            score = block.W1**2 / d.unsqueeze(0) ** 2  # (out, B) OBS saliency of each weight of the block
            k = n_pruned(self.n_out * block.i2, self.sparsity) - n_pruned(self.n_out * block.i1, self.sparsity)
            self.keep[:, block.i1 : block.i2] = prune_lowest(score.flatten(), k).reshape(score.shape)

    def __call__(self, j: int, w: Tensor) -> Tensor:
        if isinstance(self.pattern, NM) and j % self.pattern.m == 0:
            cols = torch.arange(j, j + self.pattern.m, device=w.device)
            live = self.block.current(cols)  # (out, M) updated values of the group's columns
            d = self.block.Hinv.diagonal()[j : j + self.pattern.m]  # (M,)
            self.keep[:, j : j + self.pattern.m] = nm_keep(live**2 / d**2, self.pattern.n, self.pattern.m)
        return super().__call__(j, w)


@torch.no_grad()
def sparsegpt_prune(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    pattern: Pattern,
    *,
    scheme: IntScheme | None = None,
    keep: Tensor | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = True,
) -> SparseResult:
    """Prune ``W (out, in)`` to ``sparsity`` / ``pattern`` given ``H (in, in) = 2/n X^T X``.

    ``scheme`` also rounds the survivors (joint mode). ``keep`` fixes the mask
    instead of choosing it (then ``sparsity``/``pattern`` are not used and
    ``act_order``, solving columns by decreasing ``H_jj`` as GPTQ does, is allowed).
    """
    check_layer(W, H)
    if scheme is not None and not isinstance(scheme, IntScheme):
        raise SlimlmError(f"SparseGPT's joint mode rounds survivors to an int scheme (int2..8, e.g. int4-g64), "
                          f"got {scheme!r}")  # fmt: skip
    solve = dict(scheme=scheme, blocksize=blocksize, percdamp=percdamp, static_groups=static_groups)
    if keep is not None:
        return solve_with_mask(W, H, keep, act_order=act_order, **solve)
    check_fits(pattern, W.shape[1])
    if act_order:
        raise SlimlmError("act_order needs a fixed mask (keep=...): SparseGPT chooses its mask in column order")

    def adaptive(prob: ObsProblem, grid: ColumnGrid | None) -> _Pruner:
        return _Pruner(prob.W, sparsity, pattern, grid)

    return masked_solve(W, H, adaptive, **solve)
