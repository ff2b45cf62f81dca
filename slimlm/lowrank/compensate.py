"""Low-rank compensation of a quantization residual: EoRA / LQER, one function.

A quantized layer computes with ``W_hat = dequant(Q(W))`` instead of ``W``; the
residual ``E = W - W_hat`` (``out x in``) is what it loses. A float side path
``B @ A`` of rank ``r`` added to the layer's output gives back as much of
``E x`` as rank ``r`` can hold. In the layer's output-error norm on
calibration inputs with Gram matrix ``H = sum x x^T``,

    ||(E - B A) X^T||_F^2 = tr((E - B A) H (E - B A)^T),

the best ``B A`` is the truncated SVD of ``E S`` mapped back, ``S S^T = H``
(:mod:`slimlm.solvers.lowrank`, the same map SVD-LLM applies to ``W``), and
the error left is exactly the energy of the dropped singular values of
``E S``. EoRA (Liu et al. 2024, "EoRA: Training-free Compensation for
Compressed LLM with Eigenspace Low-Rank Approximation", arXiv:2410.21271)
projects onto the eigenvectors of ``H`` scaled by the square roots of the
eigenvalues, i.e. ``S = Q Lambda^1/2``; any ``S`` with ``S S^T = H`` differs
from it by an orthogonal factor, which changes neither the truncation nor
``B A``, so the Cholesky factor is used. LQER (Zhang et al. 2024,
arXiv:2402.02446) scales by a diagonal of activation magnitudes instead;
without whitening (``H`` = None) it is the plain SVD of ``E``, which ignores
which input directions the data uses (ZeroQuant-V2's LoRC).
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.solvers.lowrank import cholesky_whitening, spectrum


@torch.no_grad()
def compensation(W: Tensor, W_hat: Tensor, H: Tensor | None, rank: int, *,
                 damp: float = 0.01) -> tuple[Tensor, Tensor, float]:  # fmt: skip
    """``(A (rank, in), B (out, rank), dropped)``: the best rank-``rank`` ``B @ A`` of ``W - W_hat``.

    Best in the output-error norm of inputs with Gram ``H`` (``H`` None: in
    the Frobenius norm of the residual). ``dropped`` is the fraction of the
    residual's (whitened) energy the side path leaves, so ``1 - dropped`` is
    what it gives back. Float32 factors; the SVD runs in float64.
    """
    E = W.double() - W_hat.to(W.device).double()  # (out, in)
    whitening = None if H is None else cholesky_whitening(H.to(W.device), damp=damp)
    sp = spectrum(E, whitening)
    A, B = sp.factors(rank, dtype=torch.float32)
    return A, B, sp.dropped_energy(rank)


def output_error(E: Tensor, H: Tensor) -> float:
    """``tr(E H E^T)``: the summed squared output error of a weight error ``E (out, in)`` on inputs of Gram ``H``."""
    E = E.double()
    return float(((E @ H.double()) * E).sum())
