"""Non-uniform codebook quantization by 1-D k-means (weight sharing).

Han, Mao, Dally. "Deep Compression: Compressing Deep Neural Networks with
Pruning, Trained Quantization and Huffman Coding", ICLR 2016
(arXiv:1510.00149), section 3.

``2^b`` shared values (centroids) are fit to the weights by Lloyd's
algorithm, per tensor or per output row; each weight stores the ``b``-bit
index of its nearest centroid, and the codebook is stored beside it
(float16 here). The paper finds *linear* initialisation (centroids evenly
spaced between min and max) best because it keeps the rare large weights
represented; *quantile* initialisation (density-based) is the alternative.

In one dimension Lloyd is exact and cheap on sorted data: with sorted
centroids every cluster is an interval of the sorted weights, bounded by
the midpoints between neighbouring centroids, so one iteration is a
``searchsorted`` and two prefix-sum lookups. No randomness, no atomics:
the fit is deterministic for a fixed iteration count.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

CODEBOOK_DTYPE = torch.float16


class KMeansInit(Enum):
    """Centroid initialisation: evenly spaced over [min, max], or at quantiles."""

    LINEAR = "linear"
    QUANTILE = "quantile"


def _init_centroids(xs: Tensor, k: int, init: KMeansInit) -> Tensor:
    """Initial sorted centroids ``(R, k)`` from sorted rows ``xs (R, N)``."""
    t = torch.linspace(0.0, 1.0, k, device=xs.device)  # (k,)
    if init is KMeansInit.LINEAR:
        lo, hi = xs[:, :1], xs[:, -1:]  # (R, 1)
        return lo + (hi - lo) * t  # (R, k)
    n = xs.shape[1]
    pos = ((torch.arange(k, device=xs.device) + 0.5) * n / k).long().clamp(max=n - 1)  # (k,)
    return xs[:, pos]  # (R, k)


def _assign_sorted(xs: Tensor, centroids: Tensor) -> Tensor:
    """Cluster boundaries in sorted rows: ``(R, k + 1)`` start indices, with ends."""
    mids = (centroids[:, 1:] + centroids[:, :-1]) / 2  # (R, k - 1)
    inner = torch.searchsorted(xs, mids.contiguous(), right=True)  # (R, k - 1) count of x <= mid
    R, N = xs.shape
    zeros = torch.zeros(R, 1, dtype=inner.dtype, device=xs.device)
    return torch.cat([zeros, inner, torch.full_like(zeros, N)], dim=1)  # (R, k + 1)


@torch.no_grad()
def kmeans_codebook(
    W: Tensor, *, bits: int, per_row: bool = True, iters: int = 20, init: KMeansInit = KMeansInit.LINEAR
) -> Tensor:
    """Fit ``2^bits`` centroids to ``W (out, in)``: float32 ``(out or 1, 2^bits)``, ascending.

    The returned codebook is rounded to float16 (what a checkpoint stores).
    """
    k = 2**bits
    x = W.float().reshape(W.shape[0] if per_row else 1, -1)  # (R, N)
    xs = x.sort(dim=1).values
    # Prefix sums in float64: differences of long float32 running sums lose digits.
    prefix = torch.nn.functional.pad(xs.double().cumsum(dim=1), (1, 0))  # (R, N + 1)
    C = _init_centroids(xs, k, init)
    for _ in range(iters):  # Lloyd: assign to nearest, move to the mean
        edges = _assign_sorted(xs, C)  # (R, k + 1)
        sums = prefix.gather(1, edges[:, 1:]) - prefix.gather(1, edges[:, :-1])  # (R, k)
        counts = (edges[:, 1:] - edges[:, :-1]).double()  # (R, k)
        means = (sums / counts.clamp(min=1)).float()
        C = torch.where(counts > 0, means, C).sort(dim=1).values  # empty cluster keeps its centroid
    return C.to(CODEBOOK_DTYPE).float().sort(dim=1).values


@torch.no_grad()
def kmeans_quantize(W: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest centroid for each weight: uint8 shaped like ``W``."""
    R = codebook.shape[0]
    x = W.float().reshape(R, -1)  # (R, N)
    mids = (codebook[:, 1:] + codebook[:, :-1]) / 2  # (R, k - 1)
    codes = torch.searchsorted(mids.contiguous(), x.contiguous())  # (R, N): x == mid goes low
    return codes.reshape(W.shape).to(torch.uint8)


@torch.no_grad()
def kmeans_dequantize(codes: Tensor, codebook: Tensor) -> Tensor:
    """``codebook[row, codes]`` in float32, shaped like ``codes``."""
    R = codebook.shape[0]
    idx = codes.long().reshape(R, -1)  # (R, N)
    return codebook.gather(1, idx).reshape(codes.shape)
