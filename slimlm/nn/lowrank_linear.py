"""LowRankLinear: a linear stored as two thin matrices, ``y = B (A x) + b``.

``A`` is ``rank x in`` and ``B`` is ``out x rank``, both float in the model's
dtype, so the layer holds ``rank * (in + out)`` weights instead of
``in * out``: fewer only while ``rank < in * out / (in + out)`` (the
break-even rank). Built from factors (:mod:`slimlm.solvers.lowrank` computes
them) or as an empty shell that ``load_state_dict`` fills; the rank is the one
fact of its structure beyond the base manifest entry (``manifest_extra``).

Unlike the packed modules, ``A`` and ``B`` are ordinary parameters: a dtype
cast of the model casts them, the size accounting counts them as parameters,
and training (distillation after factorization) can update them. The forward
is two ``F.linear`` calls, the decode speed-up where the rank is low enough.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.nn.runtime import RuntimeModule
from slimlm.validate import check_pos_int


def break_even_rank(in_features: int, out_features: int) -> float:
    """The rank at which two factors hold as many weights as the dense matrix: ``in * out / (in + out)``."""
    return in_features * out_features / (in_features + out_features)


class LowRankLinear(RuntimeModule):
    """``y = x A^T B^T + b`` with ``A (rank, in)`` and ``B (out, rank)``."""

    trainable_floats = True  # distillation after factorization trains A, B (and the bias)

    def __init__(self, in_features: int, out_features: int, rank: int, *, bias: bool, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:  # fmt: skip
        super().__init__()
        check_pos_int("rank", rank, "kept singular directions")
        if rank > min(in_features, out_features):
            raise SlimlmError(f"rank {rank} exceeds min(in, out) = {min(in_features, out_features)} of a "
                              f"{out_features}x{in_features} layer; give rank <= {min(in_features, out_features)}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype, device=device), requires_grad=False)
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device), requires_grad=False)
        b = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        self.bias = nn.Parameter(b, requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_factors(cls, A: Tensor, B: Tensor, bias: Tensor | None = None, *,
                     dtype: torch.dtype | None = None) -> LowRankLinear:  # fmt: skip
        """The layer ``B @ A`` (+ ``bias``), stored in ``dtype`` (default: ``A``'s)."""
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            raise SlimlmError(f"factors must be A (rank, in) and B (out, rank), got A {tuple(A.shape)} and "
                              f"B {tuple(B.shape)}")  # fmt: skip
        rank, in_features = A.shape
        out_features = B.shape[0]
        if bias is not None and bias.shape != (out_features,):
            raise SlimlmError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        dtype = dtype or A.dtype
        module = cls(in_features, out_features, rank, bias=bias is not None, dtype=dtype, device=A.device)
        module.A.copy_(A)
        module.B.copy_(B)
        if bias is not None:
            module.bias.copy_(bias.detach())
        return module

    @classmethod
    def empty(cls, in_features: int, out_features: int, *, bias: bool, rank: int, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> LowRankLinear:  # fmt: skip
        """A zero shell of the recorded structure; ``load_state_dict`` fills it."""
        return cls(in_features, out_features, rank, bias=bias, dtype=dtype, device=device)

    def manifest_extra(self) -> dict[str, Any]:
        return {"rank": self.rank}

    def dequantized_weight(self) -> Tensor:
        """The dense ``B @ A`` ``(out, in)`` in float32 (what a dense export writes)."""
        return self.B.detach().float() @ self.A.detach().float()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.A), self.B, self.bias)  # (..., in) -> (..., rank) -> (..., out)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")  # fmt: skip
