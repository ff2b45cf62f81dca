"""The best rank-r approximation of a weight in the norm of its layer's output error.

For a linear ``y = W x`` (``W`` is ``out x in``) and calibration inputs with
Gram matrix ``H = sum x x^T`` (the ``H`` that :mod:`slimlm.calib.stats`
gathers, up to a positive factor that changes nothing here), replacing ``W``
by ``W'`` costs

    ||(W - W') X^T||_F^2 = tr((W - W') H (W - W')^T) = ||(W - W') S||_F^2   for any S with S S^T = H.

So the best ``W'`` of rank ``r`` is the truncated SVD of ``W S`` mapped back:
``W S = U diag(s) V^T``, ``W' = U_r diag(s_r) V_r^T S^-1`` (Eckart-Young in
the whitened space). This one function is three published methods, by the
choice of ``S``:

* ``S = I``: plain truncated SVD (minimises ``||W - W'||_F``, ignores the data);
* ``S = diag(a)``, ``a_j = mean|x_j|^alpha``: ASVD's activation-aware scaling
  (Yuan et al. 2023, "ASVD: Activation-aware Singular Value Decomposition for
  Compressing Large Language Models", arXiv:2312.05821);
* ``S = chol(H)``: SVD-LLM's truncation-aware whitening (Wang et al. 2024,
  "SVD-LLM: Truncation-aware Singular Value Decomposition for Large Language
  Model Compression", arXiv:2403.07378), where dropping singular value
  ``s_i`` costs exactly ``s_i^2`` of output error.

Low-rank compensation of a quantization residual (EoRA, Liu et al. 2024,
arXiv:2410.21271; LQER, Zhang et al. 2024, arXiv:2402.02446) applies the
same map to ``E = W - Q(W)`` instead of ``W``.

The factors are returned split evenly, ``B = U_r diag(sqrt s_r)`` (``out x r``)
and ``A = diag(sqrt s_r) V_r^T S^-1`` (``r x in``), so ``W' = B @ A`` and
neither factor carries all the scale (better conditioned for training or
quantizing them later).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from slimlm.errors import SlimlmError

log = logging.getLogger("slimlm.solvers")


@dataclass(frozen=True)
class Whitening:
    """``S`` with ``S S^T = H`` (``matrix``, lower triangular) or a diagonal ``S`` (``diag``); neither = identity."""

    matrix: Tensor | None = None
    diag: Tensor | None = None

    def apply(self, M: Tensor) -> Tensor:
        """``M S``."""
        if self.matrix is not None:
            return M @ self.matrix
        if self.diag is not None:
            return M * self.diag
        return M

    def undo(self, A: Tensor) -> Tensor:
        """``A S^-1`` (a triangular solve, never an explicit inverse)."""
        if self.matrix is not None:
            return torch.linalg.solve_triangular(self.matrix, A, upper=False, left=False)
        if self.diag is not None:
            return A / self.diag
        return A


def cholesky_whitening(H: Tensor, *, damp: float = 1e-2) -> Whitening:
    """``S = chol(H + damp * mean(diag H) * I)``; the dampening rises tenfold (logged) until it factors.

    Dead inputs (``H_jj = 0``) keep ``H`` singular; the dampening keeps ``S``
    invertible and costs nothing for them (their input is always 0).
    """
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise SlimlmError(f"the Gram matrix must be square, got {tuple(H.shape)}")
    H = H.double()
    mean_diag = max(H.diagonal().mean().item(), 1e-12)
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    lam = damp * mean_diag
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if info == 0:
            return Whitening(matrix=L)
        lam = max(lam * 10, 1e-8 * mean_diag)
        log.warning("Gram matrix not positive definite; raising dampening to %.3g", lam)
    raise SlimlmError("the Gram matrix stays singular after dampening; check the calibration inputs for NaN/Inf")


def scale_whitening(scale: Tensor) -> Whitening:
    """A diagonal ``S`` from positive per-input-channel scales (ASVD); zero scales become the smallest positive."""
    scale = scale.double()
    if scale.ndim != 1 or not torch.isfinite(scale).all() or (scale < 0).any():
        raise SlimlmError("input scales must be a finite, non-negative vector; check the calibration inputs")
    floor = scale[scale > 0].min() if (scale > 0).any() else torch.tensor(1.0, dtype=scale.dtype)
    return Whitening(diag=torch.where(scale > 0, scale, floor))


@dataclass(frozen=True)
class Spectrum:
    """The whitened SVD of one matrix, before truncation: ``M S = U diag(s) Vh``."""

    U: Tensor
    s: Tensor
    Vh: Tensor
    whitening: Whitening

    def factors(self, rank: int, *, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """``(A, B)`` of the best rank-``rank`` approximation: ``A`` is ``rank x in``, ``B`` is ``out x rank``."""
        full = self.s.numel()
        if not 1 <= rank <= full:
            raise SlimlmError(f"rank must be in 1..{full} (min of the layer's sizes), got {rank}")
        root = self.s[:rank].sqrt()
        B = self.U[:, :rank] * root
        A = self.whitening.undo(root[:, None] * self.Vh[:rank])
        return A.to(dtype), B.to(dtype)

    def dropped_energy(self, rank: int) -> float:
        """Fraction of ``||M S||_F^2`` a rank-``rank`` truncation drops (the output error it costs, relative)."""
        energy = self.s.square()
        return float(energy[rank:].sum() / energy.sum().clamp_min(1e-30))


def spectrum(M: Tensor, whitening: Whitening | None = None) -> Spectrum:
    """The whitened SVD of ``M`` (``out x in``), computed in float64."""
    if M.ndim != 2:
        raise SlimlmError(f"expected a 2-D weight, got shape {tuple(M.shape)}")
    whitening = whitening or Whitening()
    U, s, Vh = torch.linalg.svd(whitening.apply(M.double()), full_matrices=False)
    return Spectrum(U, s, Vh, whitening)


def lowrank_factors(M: Tensor, rank: int, whitening: Whitening | None = None) -> tuple[Tensor, Tensor]:
    """``(A, B)`` with ``B @ A`` the best rank-``rank`` approximation of ``M`` in the whitened norm."""
    return spectrum(M, whitening).factors(rank, dtype=M.dtype)
