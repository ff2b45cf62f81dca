"""The Optimal Brain Surgeon column solver shared by GPTQ and SparseGPT.

Frantar, Ashkboos, Hoefler, Alistarh. "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", ICLR 2023
(arXiv:2210.17323), Algorithm 1; Frantar & Alistarh. "SparseGPT: Massive
Language Models Can Be Accurately Pruned in One-Shot", ICML 2023
(arXiv:2301.00774), Algorithm 1.

Both minimise the layer-wise error ``||W X - W' X||^2`` one input column at
a time. With ``H = 2/n X X^T``, fixing column ``j`` of ``W`` to a value
``q`` (a rounded or a pruned column) costs ``(w_j - q)^2 / (2 [H^-1]_jj)``
and is best compensated by moving the columns not yet fixed by

    W[:, j:] -= (w_j - q) / [H^-1]_jj * [H^-1]_{j, j:}

where ``H^-1`` is the inverse Hessian of the columns not yet fixed. Row
``j`` of the upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``)
holds exactly those entries (up to a per-row factor that cancels), so one
Cholesky replaces the sequence of inverse updates. Updates are applied
lazily: within a block of ``blocksize`` columns immediately, to the columns
after the block once per block as one matrix product.

What "fixing a column" means is left to the caller: ``quantize_column(j, w)``
returns the new column (GPTQ rounds it to the grid, SparseGPT zeroes the
masked entries). ``on_block(block)`` is called at the start of each lazy
block with its live state, where SparseGPT chooses its adaptive mask.

The set-up both papers' reference code does before the loop is
:func:`prepare`:

* dead inputs (``H_jj = 0``, the input is always 0) get ``H_jj = 1`` and
  ``W[:, j] = 0``: their weight never matters and keeps ``H`` invertible;
* act-order (GPTQ, and SparseGPT with a fixed mask): columns are solved by
  decreasing ``H_jj`` (most active inputs first, while the most columns
  remain to absorb their error), then un-permuted by the caller;
* dampening ``lambda = percdamp * mean(diag H)`` added to the diagonal
  (:func:`dampen_and_invert`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from slimlm.errors import SlimlmError

log = logging.getLogger("slimlm.solvers")

ColumnFn = Callable[[int, Tensor], Tensor]


@dataclass
class LazyBlock:
    """The lazy block being solved: columns ``i1:i2`` (in solve order) of the working weight.

    ``W1`` is live: the loop updates it in place, so a callback may read the
    current value of a later column of the block (SparseGPT's N:M mask is
    chosen every M columns from the updated weights). Columns at and after
    ``i2`` of ``W`` still lack this block's updates; :meth:`current` adds them.
    """

    i1: int
    i2: int
    W: Tensor  # (out, in) working weight; columns >= i2 are stale by this block's pending update
    W1: Tensor  # (out, i2 - i1) live copy of this block's columns
    Hinv: Tensor  # (in, in) upper Cholesky factor of H^-1
    Err1: Tensor  # (out, i2 - i1) scaled errors (w - q) / d of the columns fixed so far
    done: int = 0  # columns of this block fixed so far

    @property
    def Hinv1(self) -> Tensor:
        return self.Hinv[self.i1 : self.i2, self.i1 : self.i2]  # (B, B)

    def current(self, cols: Tensor) -> Tensor:
        """Up-to-date values ``(out, len(cols))`` of not-yet-fixed columns ``cols`` (solve-order indices)."""
        cols = torch.as_tensor(cols, device=self.W.device)
        if bool((cols < self.i1 + self.done).any()):
            raise SlimlmError("LazyBlock.current reads only columns not yet fixed")
        out = torch.empty(self.W.shape[0], cols.numel(), device=self.W.device)
        inside = cols < self.i2
        out[:, inside] = self.W1[:, cols[inside] - self.i1]
        later = cols[~inside]
        pending = self.Err1[:, : self.done] @ self.Hinv[self.i1 : self.i1 + self.done][:, later]  # (out, k)
        out[:, ~inside] = self.W[:, later] - pending
        return out


def check_layer(W: Tensor, H: Tensor) -> None:
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise SlimlmError(f"W must be (out, in) and H (in, in); got {tuple(W.shape)} and {tuple(H.shape)}")


@dataclass(frozen=True, eq=False)
class ObsProblem:
    """One layer made ready for :func:`obs_solve` by :func:`prepare`."""

    W: Tensor  # (out, in) float32 copy in the original column order, dead columns zeroed
    perm: Tensor  # (in,) solve position -> original column
    Hinv: Tensor  # (in, in) upper Cholesky factor of the dampened H^-1, in solve order
    damp: float  # dampening added to the diagonal
    dead: int  # inputs with H_jj = 0
    t0: float  # perf_counter() when the set-up began

    def stats(self, losses: Tensor) -> dict:
        """``{"loss": sum of the column losses, "damp", "dead", "seconds"}`` of a finished solve."""
        return {"loss": float(losses.sum()), "damp": self.damp, "dead": self.dead,
                "seconds": time.perf_counter() - self.t0}  # fmt: skip


@torch.no_grad()
def prepare(W: Tensor, H: Tensor, *, percdamp: float, act_order: bool = False) -> ObsProblem:
    """Dead inputs, solve order and dampened inverse of ``W (out, in)``, ``H (in, in)`` (inputs are not changed)."""
    t0 = time.perf_counter()
    check_layer(W, H)
    W, H = W.detach().float().clone(), H.detach().float().to(W.device).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(W.shape[1], device=W.device)
    Hinv, damp = dampen_and_invert(H[perm][:, perm], percdamp)
    return ObsProblem(W, perm, Hinv, damp, int(dead.sum()), t0)


def dampen_and_invert(H: Tensor, percdamp: float) -> tuple[Tensor, float]:
    """``(U, damp)``: the upper Cholesky factor of ``(H + damp I)^-1``, ``damp = percdamp * mean(diag H)``.

    If rounding leaves the dampened ``H`` not positive definite, the
    dampening is raised tenfold (logged) until the factorisation succeeds.
    """
    H = H.float()
    mean_diag = H.diagonal().mean().item()
    eye = torch.eye(H.shape[0], device=H.device)
    damp = percdamp * mean_diag
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U, damp
        damp = max(damp * 10, 1e-6 * max(mean_diag, 1e-12))
        log.warning("Hessian not positive definite; raising dampening to %.3g", damp)
    raise SlimlmError("the Hessian stays singular after dampening; check the calibration inputs for NaN/Inf")


@torch.no_grad()
def obs_solve(
    W: Tensor,
    Hinv: Tensor,
    quantize_column: ColumnFn,
    *,
    on_block: Callable[[LazyBlock], None] | None = None,
    blocksize: int = 128,
) -> tuple[Tensor, Tensor]:
    """Fix the columns of ``W (out, in)`` left to right, compensating each on the ones after it.

    ``Hinv`` is the upper Cholesky factor of the dampened inverse Hessian
    (:func:`dampen_and_invert`), in the same column order as ``W``.
    ``quantize_column(j, w)`` maps the current column ``j`` ``(out,)`` to its
    fixed value ``(out,)``. Returns ``(Q, losses)``: the fixed weight
    ``(out, in)`` float32 and each column's loss ``sum_rows (w - q)^2 / (2 d^2)``
    ``(in,)``, whose sum is GPTQ's estimate of the layer-output error.
    """
    if W.dim() != 2 or Hinv.shape != (W.shape[1], W.shape[1]):
        raise SlimlmError(f"W must be (out, in) and Hinv (in, in); got {tuple(W.shape)} and {tuple(Hinv.shape)}")
    W = W.float().clone()
    n_out, n_in = W.shape
    Q = torch.zeros_like(W)
    losses = torch.zeros(n_in, device=W.device)
    # --- the paper's core loop (GPTQ Algorithm 1) ---
    for i1 in range(0, n_in, blocksize):
        i2 = min(i1 + blocksize, n_in)
        block = LazyBlock(i1, i2, W, W[:, i1:i2].clone(), Hinv, torch.zeros(n_out, i2 - i1, device=W.device))
        W1, Err1, Hinv1 = block.W1, block.Err1, block.Hinv1
        if on_block is not None:
            on_block(block)
        d = Hinv1.diagonal()  # (B,)
        for i in range(i2 - i1):
            w = W1[:, i]  # (out,): final once its turn comes (only later columns are updated)
            q = quantize_column(i1 + i, w.clone()).float()  # (out,)
            Q[:, i1 + i] = q
            torch.div(w - q, d[i], out=Err1[:, i])  # (out,) scaled error
            W1[:, i + 1 :].addr_(Err1[:, i], Hinv1[i, i + 1 :], alpha=-1.0)  # in-block OBS update
            block.done = i + 1
        losses[i1:i2] = (Err1.square().sum(0)) / 2  # (w - q)^2 / d^2 / 2 per column
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy update of every later column, (out, n_in - i2)
    return Q, losses
