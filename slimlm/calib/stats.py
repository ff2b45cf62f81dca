"""Per-linear input statistics gathered while a block runs on calibration data.

For an input X of a linear (tokens as rows, ``in`` columns):
- ``H = 2/n * sum X^T X``: the Hessian of the layer-wise squared error that
  GPTQ and SparseGPT use (Frantar et al.); kept in float32.
- ``absmax``: per input channel max |x| (SmoothQuant, LLM.int8 outliers).
- ``sq_sum``: per input channel sum of x^2 (Wanda's ||x_j||_2^2, AWQ's scale).
- ``sample``: up to ``keep_rows`` input rows for methods that search by
  re-computing outputs (AWQ, clipping search).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


SPLIT_AT = 1024  # Gram matrices at least this wide are built from half-width products


@torch.no_grad()
def add_gram(H: Tensor, X: Tensor, *, beta: float, alpha: float) -> None:
    """``H = beta * H + alpha * X^T X`` in place, for ``X (rows, n)`` and symmetric ``H (n, n)``.

    From ``SPLIT_AT`` columns on, only the two diagonal blocks and the upper
    off-diagonal block are multiplied (3/4 of the work) and the lower block is
    mirrored: down_proj's 1536-wide inputs are most of GPTQ's statistics time.
    """
    n = X.shape[1]
    if n < SPLIT_AT:
        H.addmm_(X.t(), X, beta=beta, alpha=alpha)
        return
    h = n // 2
    A, B = X[:, :h], X[:, h:]
    H[:h, :h].addmm_(A.t(), A, beta=beta, alpha=alpha)
    H[:h, h:].addmm_(A.t(), B, beta=beta, alpha=alpha)
    H[h:, h:].addmm_(B.t(), B, beta=beta, alpha=alpha)
    H[h:, :h] = H[:h, h:].t()


@dataclass(frozen=True)
class StatsSpec:
    """Which statistics a method needs (the runner gathers only these)."""

    hessian: bool = False
    absmax: bool = False
    sq_sum: bool = False
    keep_rows: int = 0  # input rows kept as a sample (0 = none)


@dataclass
class LinearStats:
    in_features: int
    spec: StatsSpec
    n: int = 0  # rows (tokens) seen
    H: Tensor | None = None  # (in, in) float32
    absmax: Tensor | None = None  # (in,)
    sq_sum: Tensor | None = None  # (in,)
    sample: list[Tensor] = field(default_factory=list)  # [(rows, in)] float32

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        """Accumulate one input batch ``x (..., in)``."""
        X = x.reshape(-1, x.shape[-1]).float()  # (rows, in)
        rows = X.shape[0]
        if self.spec.hessian:
            if self.H is None:
                self.H = torch.zeros(self.in_features, self.in_features, device=X.device)
            # running mean of 2 X^T X / n, rescaled as n grows (GPTQ's add_batch)
            add_gram(self.H, X, beta=self.n / (self.n + rows), alpha=2.0 / (self.n + rows))
        if self.spec.absmax:
            m = X.abs().amax(0)
            self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        if self.spec.sq_sum:
            s = X.square().sum(0)
            self.sq_sum = s if self.sq_sum is None else self.sq_sum + s
        if self.spec.keep_rows:
            have = sum(t.shape[0] for t in self.sample)
            if have < self.spec.keep_rows:
                self.sample.append(X[: self.spec.keep_rows - have].clone())
        self.n += rows

    def sample_rows(self) -> Tensor:
        """The kept input rows, (rows, in) float32."""
        return torch.cat(self.sample) if self.sample else torch.empty(0, self.in_features)
