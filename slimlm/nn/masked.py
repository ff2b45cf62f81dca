"""MaskedLinear: a training-time linear whose pruned weights stay zero.

Recovery training of a pruned model (distillation after SparseGPT, Wanda or
magnitude pruning) trains the surviving weights and keeps the mask fixed:
the forward multiplies ``W * keep``, so a pruned weight gets no gradient and
contributes nothing, and :meth:`MaskedLinear.to_sparse_linear` stores the
trained survivors in a :class:`~slimlm.nn.SparseLinear` with the same mask
(and N:M pattern). Like FakeQuantLinear it is not a runtime module:
checkpoints never hold it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimlm.nn.sparse_linear import SparseLinear

__all__ = ["MaskedLinear"]


class MaskedLinear(nn.Module):
    """``y = x @ (W * keep)^T + b`` with a trainable float ``W (out, in)`` and a fixed bool ``keep``."""

    def __init__(self, weight: Tensor, keep: Tensor, bias: Tensor | None, *, nm=None,  # noqa: ANN001
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(torch.where(keep, weight, torch.zeros_like(weight)).float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().float())
        self.register_buffer("keep", keep.clone(), persistent=False)
        self.nm = nm
        self.dtype = dtype or weight.dtype  # what to_sparse_linear stores

    @classmethod
    @torch.no_grad()
    def from_sparse(cls, module: SparseLinear) -> MaskedLinear:
        """The trainable form of a SparseLinear: its kept weights, its mask, its bias."""
        bias = None if module.bias is None else module.bias.detach()
        return cls(module.dequantized_weight(), module.keep_mask(), bias, nm=module.nm, dtype=module.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        W = self.weight * self.keep  # (out, in); pruned entries get zero gradient
        b = self.bias
        return F.linear(x, W.to(x.dtype), None if b is None else b.to(x.dtype))

    @torch.no_grad()
    def to_sparse_linear(self) -> SparseLinear:
        """A SparseLinear holding the trained survivors under the same mask, in the original dtype."""
        shell = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=self.dtype,
                          device=self.weight.device)  # fmt: skip
        shell.weight.copy_(self.weight)
        if self.bias is not None:
            shell.bias.copy_(self.bias)
        return SparseLinear.from_linear(shell, self.keep, nm=self.nm)
