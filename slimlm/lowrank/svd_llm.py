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

Not implemented: the paper's layer-wise closed-form update of the remaining
factor. It solves ``min_A ||W X - B A X'||`` with ``X`` the original model's
inputs and ``X'`` the compressed model's; the runner carries one stream of
inputs (``X = X'``), and then the update returns the factor we already have
(``A = B^+ W`` equals ``diag(sqrt s) V^T S^-1``), so it needs a second, uncompressed
activation stream through the walk.
"""

from __future__ import annotations

import torch

from slimlm.calib.stats import LinearStats
from slimlm.solvers.lowrank import Whitening, cholesky_whitening


@torch.no_grad()
def svd_llm_whitening(stats: LinearStats, damp: float) -> Whitening:
    """``S = chol(H + damp * mean(diag H) * I)`` from the runner's Gram matrix."""
    return cholesky_whitening(stats.H, damp=damp)
