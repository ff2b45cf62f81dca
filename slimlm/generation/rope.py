"""Rotary position embedding (Su et al. 2021, RoFormer) as a cos/sin table indexed by position.

The table is computed once by the model's own rotary module (so every rope
variant transformers implements -- llama3, yarn, linear scaling -- comes out
the same as in the HF forward) and then indexed per step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimlm.errors import SlimlmError


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rope:
    """``rope(x, positions)``: rotate x (B, H, T, D) at positions (B, T) (negative = padding, clamped to 0)."""

    def __init__(self, cos: Tensor, sin: Tensor):
        self.cos, self.sin = cos, sin  # (P, D) each

    @classmethod
    def from_module(cls, rotary: nn.Module, max_positions: int, *, dtype: torch.dtype, device) -> "Rope":
        """The table for positions 0..max_positions-1 from an HF ``*RotaryEmbedding`` module."""
        pos = torch.arange(max_positions, device=device)[None]  # (1, P)
        probe = torch.empty(0, dtype=dtype, device=device)
        with torch.no_grad():
            cos, sin = rotary(probe, pos)  # (1, P, D) each, in dtype
        return cls(cos[0], sin[0])

    @property
    def max_positions(self) -> int:
        return self.cos.shape[0]

    def _index(self, positions: Tensor) -> Tensor:
        # a data-dependent check would break a compiled graph, and a CUDA graph being recorded (GraphStep)
        checked = not torch.compiler.is_compiling() and not (positions.is_cuda and torch.cuda.is_current_stream_capturing())
        if checked and positions.numel() and int(positions.max()) >= self.max_positions:
            raise SlimlmError(f"position {int(positions.max())} is past the rotary table "
                              f"({self.max_positions} positions); generate fewer tokens or build a larger table")
        return positions.clamp_min(0)

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T) positions -> cos, sin (B, 1, T, D), broadcast over heads (for ``apply_rotary``)."""
        idx = self._index(positions)
        return self.cos[idx][:, None], self.sin[idx][:, None]

    def cos_sin_signed(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T) positions -> cos, signed sin (B, 1, T, D) (for ``apply_rotary_signed``)."""
        idx = self._index(positions)
        return self.cos[idx][:, None], self.sin_signed[idx][:, None]

    @property
    def sin_signed(self) -> Tensor:
        """(P, D) sin with its first half negated: rotate_half's sign folded into the table."""
        if getattr(self, "_sin_signed", None) is None:
            half = self.sin.shape[-1] // 2
            self._sin_signed = torch.cat([-self.sin[:, :half], self.sin[:, half:]], dim=-1)
        return self._sin_signed

    def __call__(self, x: Tensor, positions: Tensor) -> Tensor:
        return apply_rotary_signed(x, *self.cos_sin_signed(positions))


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, D) rotated with cos/sin broadcastable to it (HF's formula)."""
    return x * cos + rotate_half(x) * sin


def apply_rotary_signed(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """``apply_rotary`` with the signed sin table: rotate_half(x) * sin = roll(x) * [-sin1, sin2]
    (the same products, negation being exact), in three ops instead of five."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed
