"""SVD-LLM's truncation-aware whitening (Wang et al. 2024, "SVD-LLM: Truncation-aware Singular Value
Decomposition for Large Language Model Compression", arXiv:2403.07378).

With ``S`` the Cholesky factor of the inputs' Gram matrix (``S S^T = X^T X``),
truncating singular value ``s_i`` of ``W S`` costs exactly ``s_i^2`` of the
layer's squared output error (the paper's Theorem 3.2;
:mod:`slimlm.solvers.lowrank` derives it), so dropping the smallest ones is the
optimal rank-r choice for the calibration inputs. The runner's ``H = 2/n X^T X``
differs from ``X^T X`` by a positive factor, which scales every ``s_i`` alike.
As in the paper, block ``i`` is whitened with the inputs of the already
factorized blocks before it (the runner re-runs each rewritten block).

The closed-form update of the remaining factor (``update: true``; the
paper's parameter update after truncation, here in closed form for our
``B A`` layout): with the input factor ``A`` (``r x in``) fixed from the
truncation, the output factor minimising ``||W X^T - B A X^T||_F`` is the
least-squares solution

    B = W G A^T (A G A^T)^-1,        G = X^T X  (the runner's H, no dampening)

(set the gradient ``2 (B A - W) G A^T`` to zero). It is exact given ``A``, so
it is never worse than the truncation's own ``B`` on the calibration inputs.
When the whitening used the same ``G`` it returns that ``B`` (the truncated
SVD is already optimal there); it gains where they differ, i.e. where the
whitening was dampened (``damp > 0``, the default) or raised to factor.
``X`` are the inputs of the model whose earlier blocks are already
factorized (the runner's one activation stream), as in the paper's
sequential variant; the target is then ``W X'`` on those compressed inputs,
not the uncompressed model's ``W X`` (which would need a second, float
activation stream through the walk).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from slimlm.calib.stats import LinearStats
from slimlm.errors import SlimlmError
from slimlm.solvers.lowrank import Whitening, cholesky_whitening

log = logging.getLogger("slimlm.lowrank")


@torch.no_grad()
def svd_llm_whitening(stats: LinearStats, damp: float) -> Whitening:
    """``S = chol(H + damp * mean(diag H) * I)`` from the runner's Gram matrix."""
    return cholesky_whitening(stats.H, damp=damp)


@torch.no_grad()
def closed_form_update(W: Tensor, A: Tensor, G: Tensor) -> Tensor:
    """``B = W G A^T (A G A^T)^-1`` (``out x r``, float64): the best output factor for a fixed ``A`` (``r x in``).

    ``A G A^T`` (``r x r``) is solved by Cholesky; if ``A`` reaches into
    directions the calibration inputs never took (``G`` singular there), a
    ridge of ``1e-10`` of its mean diagonal, raised tenfold (logged), makes it
    factor, which only affects those unseen directions.
    """
    W, A, G = W.double(), A.double(), G.to(W.device).double()  # (out, in), (r, in), (in, in)
    AG = A @ G  # (r, in)
    M = AG @ A.T  # (r, r), symmetric positive semi-definite
    R = W @ AG.T  # (out, r) = W G A^T
    mean_diag = max(M.diagonal().mean().item(), 1e-300)
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    lam = 0.0
    for _ in range(12):
        L, info = torch.linalg.cholesky_ex(M + lam * eye)
        if info == 0:
            return torch.cholesky_solve(R.T, L).T  # B M = R  <=>  M B^T = R^T
        lam = max(lam * 10, 1e-10 * mean_diag)
        log.warning("A G A^T not positive definite; ridge %.3g", lam)
    raise SlimlmError("the Gram matrix of the calibration inputs stays singular in the kept directions; check the "
                      "calibration inputs for NaN/Inf, or set update: false")  # fmt: skip
