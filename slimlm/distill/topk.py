"""A teacher's top-k logits per position: what sparse logit distillation keeps of the teacher.

Storing (or shipping between processes) a teacher's full next-token
distributions costs ``B*T*V`` numbers; keeping the k largest logits and their
vocabulary indices costs ``2*B*T*k``. For SmolLM2 (V = 49152) and k = 64 that
is 768x fewer values (V / k; the long indices double the bytes of the values
they index, so ~384x fewer bytes against float32 logits). The mass outside
the top k is dropped and the kept part renormalised (see
:func:`slimlm.distill.logit.forward_kl`); with a peaked teacher the top 64
typically hold nearly all of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from slimlm.errors import SlimlmError

__all__ = ["TopKLogits", "top_k_logits"]


@dataclass(frozen=True)
class TopKLogits:
    """The k largest teacher logits per position and where they sit in the vocabulary."""

    values: Tensor  # (B, T, k) logits, largest first
    indices: Tensor  # (B, T, k) long vocabulary ids

    def __post_init__(self):
        if self.values.shape != self.indices.shape or self.values.dim() != 3:
            raise SlimlmError(f"TopKLogits values {tuple(self.values.shape)} and indices "
                              f"{tuple(self.indices.shape)} must share one (B, T, k) shape")  # fmt: skip
        if self.indices.dtype != torch.long:
            raise SlimlmError(f"TopKLogits indices must be long (torch.int64), got {self.indices.dtype}")

    @property
    def k(self) -> int:
        return self.values.shape[-1]


def top_k_logits(logits: Tensor, k: int) -> TopKLogits:
    """The ``k`` largest of ``logits (B, T, V)`` per position (1 <= k <= V)."""
    V = logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= V:
        raise SlimlmError(f"top_k must be an int in 1..{V} (the vocabulary size), got {k!r}")
    values, indices = logits.topk(k, dim=-1)  # (B, T, k) each
    return TopKLogits(values, indices)
