"""The OBS solve of a layer under a sparsity mask, with its survivors optionally rounded.

Frantar & Alistarh. "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot", ICML 2023 (arXiv:2301.00774), Algorithm 1.

Fixing column ``j`` of ``W`` means: round its kept entries with GPTQ's grid
(joint sparsity + quantization, :func:`slimlm.solvers.grid.column_grid`, or
keep them as they are without a scheme) and zero the pruned ones; the
solver spreads both errors over the columns not yet fixed
(:func:`slimlm.solvers.obs.obs_solve`). Two users:

* SparseGPT (:mod:`slimlm.prune.sparsegpt`) chooses the mask while the solve
  runs, by subclassing :class:`MaskedColumns`;
* a GPTQ step on an already pruned layer (:func:`solve_with_mask`) keeps the
  layer's mask fixed: GPTQ alone would fill the pruned weights in with its
  updates. Only there is act-order allowed (a chosen mask is chosen in column
  order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from slimlm.errors import SlimlmError
from slimlm.formats import IntScheme, QuantizedWeight
from slimlm.solvers.grid import ColumnGrid, column_grid
from slimlm.solvers.obs import LazyBlock, ObsProblem, obs_solve, prepare


@dataclass(frozen=True, eq=False)
class SparseResult:
    weight: Tensor  # (out, in) float32: survivors updated (and rounded in joint mode), zeros where pruned
    keep: Tensor  # (out, in) bool, True where kept
    qweight: QuantizedWeight | None  # joint mode: codes (out, in), pruned entries at the code of 0
    stats: dict  # loss (sum of OBS column losses), damp, dead inputs, seconds


class MaskedColumns:
    """Column callback of :func:`obs_solve`: round column ``j`` (if a grid is given), zero where ``keep`` is False.

    ``keep (out, in)`` is in solve order; a subclass may fill it in as the
    solve reaches each block (``on_block``) or column (``__call__``).
    """

    def __init__(self, keep: Tensor, grid: ColumnGrid | None) -> None:
        self.keep, self.grid = keep, grid
        self.block: LazyBlock | None = None

    def on_block(self, block: LazyBlock) -> None:
        self.block = block
        if self.grid is not None and self.grid.on_block is not None:
            self.grid.on_block(block)

    def __call__(self, j: int, w: Tensor) -> Tensor:
        q = self.grid(j, w) if self.grid is not None else w
        return torch.where(self.keep[:, j], q, torch.zeros_like(q))


def _zero_codes(qw: QuantizedWeight) -> Tensor:
    """The code of 0.0 for every weight of ``qw``: 0 (symmetric) or its group's zero point."""
    if qw.zero is None:
        return torch.zeros_like(qw.codes)
    R, g = qw.zero.shape
    z = qw.zero.unsqueeze(-1).expand(R, g, qw.codes.numel() // (R * g))  # (R, g, n) as in group_view
    return z.reshape(qw.codes.shape).to(qw.codes.dtype)


@torch.no_grad()
def masked_solve(
    W: Tensor,
    H: Tensor,
    columns: Callable[[ObsProblem, ColumnGrid | None], MaskedColumns],
    *,
    scheme: IntScheme | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = True,
) -> SparseResult:
    """Solve ``W (out, in)`` given ``H (in, in)`` with the callback ``columns(problem, grid)`` builds.

    ``scheme`` also rounds the survivors (a grid from the prepared weight,
    static groups by default). Results are back in the original column order.
    """
    prob = prepare(W, H, percdamp=percdamp, act_order=act_order)
    grid = None if scheme is None else column_grid(prob.W, scheme, prob.perm, static_groups=static_groups)
    fix = columns(prob, grid)
    Q, losses = obs_solve(prob.W[:, prob.perm], prob.Hinv, fix, on_block=fix.on_block, blocksize=blocksize)
    inv = torch.argsort(prob.perm)
    Q, kept = Q[:, inv], fix.keep[:, inv]  # back to the original column order
    qweight = None
    if grid is not None:
        qw = grid.result(tuple(prob.W.shape))
        codes = torch.where(kept, qw.codes, _zero_codes(qw))
        qweight = QuantizedWeight(qw.scheme, qw.shape, codes, scale=qw.scale, zero=qw.zero)
    return SparseResult(Q, kept, qweight, prob.stats(losses))


def solve_with_mask(W: Tensor, H: Tensor, keep: Tensor, *, scheme: IntScheme | None = None,
                    blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False,
                    static_groups: bool = True) -> SparseResult:  # fmt: skip
    """OBS update of ``W (out, in)`` with the bool mask ``keep (out, in)`` fixed, survivors rounded to ``scheme``."""
    if keep.shape != W.shape or keep.dtype != torch.bool:
        raise SlimlmError(f"keep must be a bool mask shaped like W {tuple(W.shape)}, got {keep.dtype} "
                          f"{tuple(keep.shape)}")  # fmt: skip

    def fixed(prob: ObsProblem, grid: ColumnGrid | None) -> MaskedColumns:
        return MaskedColumns(keep.to(prob.W.device)[:, prob.perm], grid)

    return masked_solve(W, H, fixed, scheme=scheme, blocksize=blocksize, percdamp=percdamp, act_order=act_order,
                        static_groups=static_groups)  # fmt: skip
