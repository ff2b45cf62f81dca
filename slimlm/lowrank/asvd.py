"""ASVD's input-channel scaling (Yuan et al. 2023, "ASVD: Activation-aware Singular Value Decomposition
for Compressing Large Language Models", arXiv:2312.05821).

The SVD is taken of ``W S`` with ``S = diag(a)``, ``a_j = (mean_t |x_tj|)^alpha``
(``alpha = 0.5`` in the paper), and ``S^-1`` is folded back into the input
factor, so channels that carry large activations are approximated more
faithfully. :func:`slimlm.solvers.lowrank.spectrum` does the SVD and the fold;
this file only says what ``S`` is.

Deviation: the calibration runner gathers ``sum_t x_tj^2`` per channel, not
``sum_t |x_tj|``, so the magnitude used is the root mean square
``sqrt(sum_t x_tj^2 / n)`` instead of the mean absolute value. Both rank
channels alike up to their distribution's shape (for a Gaussian channel RMS =
1.25 x mean |x|, a common factor that the SVD does not see); channels with rare
large outliers weigh more under RMS.
"""

from __future__ import annotations

import torch

from slimlm.calib.stats import LinearStats
from slimlm.solvers.lowrank import Whitening, scale_whitening


@torch.no_grad()
def asvd_whitening(stats: LinearStats, alpha: float) -> Whitening:
    """``S = diag(rms(x_j) ** alpha)`` from the runner's per-channel squared sums."""
    rms = (stats.sq_sum.double() / max(stats.n, 1)).sqrt()  # (in,)
    return scale_whitening(rms.pow(alpha))
