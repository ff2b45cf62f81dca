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
  rounded to an int scheme with GPTQ's grid (:func:`slimlm.quant.gptq.column_grid`,
  static group parameters computed before the solve), so pruning and
  rounding errors are compensated in one pass;
* a fixed mask (``keep=``): only the weight update and rounding run; this is
  how a GPTQ step on an already pruned layer keeps its zeros (GPTQ alone
  would fill them in with its updates).
* dead inputs (``H_jj = 0``) get ``H_jj = 1`` and weight 0; dampening
  ``percdamp * mean(diag H)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from slimlm.errors import SlimlmError
from slimlm.formats import IntScheme, QuantizedWeight
from slimlm.prune.masks import nm_keep, prune_lowest
from slimlm.prune.patterns import NM, Pattern, check_fits, n_pruned
from slimlm.solvers import LazyBlock, dampen_and_invert, obs_solve


@dataclass(frozen=True, eq=False)
class SparseResult:
    weight: Tensor  # (out, in) float32: survivors updated (and rounded in joint mode), zeros where pruned
    keep: Tensor  # (out, in) bool, True where kept
    qweight: QuantizedWeight | None  # joint mode: codes (out, in), pruned entries at the code of 0
    stats: dict  # loss (sum of OBS column losses), damp, dead inputs, seconds


class _Pruner:
    """SparseGPT's column callback and lazy-block hook, in solve order."""

    def __init__(self, W: Tensor, sparsity: float, pattern: Pattern, keep: Tensor | None, grid) -> None:
        self.n_out, self.n_in = W.shape
        self.sparsity, self.pattern, self.grid = sparsity, pattern, grid
        self.adaptive = keep is None
        self.keep = torch.ones_like(W, dtype=torch.bool) if keep is None else keep.clone()
        self.block: LazyBlock | None = None

    def on_block(self, block: LazyBlock) -> None:
        self.block = block
        if self.grid is not None and self.grid.on_block is not None:
            self.grid.on_block(block)
        if self.adaptive and not isinstance(self.pattern, NM):
            d = block.Hinv1.diagonal()  # (B,)
            score = block.W1**2 / d.unsqueeze(0) ** 2  # (out, B) OBS saliency of each weight of the block
            k = n_pruned(self.n_out * block.i2, self.sparsity) - n_pruned(self.n_out * block.i1, self.sparsity)
            self.keep[:, block.i1 : block.i2] = prune_lowest(score.flatten(), k).reshape(score.shape)

    def __call__(self, j: int, w: Tensor) -> Tensor:
        if self.adaptive and isinstance(self.pattern, NM) and j % self.pattern.m == 0:
            cols = torch.arange(j, j + self.pattern.m, device=w.device)
            live = self.block.current(cols)  # (out, M) updated values of the group's columns
            d = self.block.Hinv.diagonal()[j : j + self.pattern.m]  # (M,)
            self.keep[:, j : j + self.pattern.m] = nm_keep(live**2 / d**2, self.pattern.n, self.pattern.m)
        q = self.grid(j, w) if self.grid is not None else w
        return torch.where(self.keep[:, j], q, torch.zeros_like(q))


def _zero_codes(qw: QuantizedWeight) -> Tensor:
    """The code of 0.0 for every weight of ``qw``: 0 (symmetric) or its group's zero point."""
    if qw.zero is None:
        return torch.zeros_like(qw.codes)
    R, g = qw.zero.shape
    z = qw.zero.unsqueeze(-1).expand(R, g, qw.codes.numel() // (R * g))  # (R, g, n) as in group_view
    return z.reshape(qw.codes.shape).to(qw.codes.dtype)


def _check(W: Tensor, H: Tensor, pattern: Pattern, scheme: IntScheme | None, keep: Tensor | None) -> None:
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise SlimlmError(f"W must be (out, in) and H (in, in); got {tuple(W.shape)} and {tuple(H.shape)}")
    if scheme is not None and not isinstance(scheme, IntScheme):
        raise SlimlmError(f"SparseGPT's joint mode rounds survivors to an int scheme (int2..8, e.g. int4-g64), "
                          f"got {scheme!r}")  # fmt: skip
    if keep is not None and (keep.shape != W.shape or keep.dtype != torch.bool):
        raise SlimlmError(f"keep must be a bool mask shaped like W {tuple(W.shape)}, got {keep.dtype} "
                          f"{tuple(keep.shape)}")  # fmt: skip
    if keep is None:
        check_fits(pattern, W.shape[1])


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
    from slimlm.quant.gptq import column_grid

    t0 = time.perf_counter()
    _check(W, H, pattern, scheme, keep)
    if act_order and keep is None:
        raise SlimlmError("act_order needs a fixed mask (keep=...): SparseGPT chooses its mask in column order")
    W, H = W.detach().float().clone(), H.detach().float().to(W.device).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    n_in = W.shape[1]
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(n_in, device=W.device)
    grid = None if scheme is None else column_grid(W, scheme, perm, static_groups=static_groups)
    pruner = _Pruner(W, sparsity, pattern, None if keep is None else keep.to(W.device)[:, perm], grid)
    Hinv, damp = dampen_and_invert(H[perm][:, perm], percdamp)
    Q, losses = obs_solve(W[:, perm], Hinv, pruner, on_block=pruner.on_block, blocksize=blocksize)
    inv = torch.argsort(perm)
    Q, kept = Q[:, inv], pruner.keep[:, inv]  # back to the original column order
    qweight = None
    if grid is not None:
        qw = grid.result(tuple(W.shape))
        codes = torch.where(kept, qw.codes, _zero_codes(qw))
        qweight = QuantizedWeight(qw.scheme, qw.shape, codes, scale=qw.scale, zero=qw.zero)
    stats = {"loss": float(losses.sum()), "damp": damp, "dead": int(dead.sum()), "seconds": time.perf_counter() - t0}
    return SparseResult(Q, kept, qweight, stats)
