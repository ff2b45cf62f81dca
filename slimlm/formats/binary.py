"""Binary weights: per-row ``a * sign(W)``.

Rastegari, Ordonez, Redmon, Farhadi. "XNOR-Net: ImageNet Classification
Using Binary Convolutional Neural Networks", ECCV 2016 (arXiv:1603.05279),
section 3.1: for ``W ≈ a * B`` with ``B in {-1, +1}`` the L2-optimal choice
is ``B = sign(W)`` and ``a = mean |W|``. Here ``sign(0) = +1`` so every
weight has a code. Codes are int8 in ``{-1, +1}``, stored as one bit each
(1 for +1), with one float16 scale per row.
"""

from __future__ import annotations

import torch
from torch import Tensor

SCALE_DTYPE = torch.float16


@torch.no_grad()
def binary_quantize(W: Tensor) -> tuple[Tensor, Tensor]:
    """``(codes int8 (out, in) in {-1, +1}, scale float32 (out, 1))`` for ``W (out, in)``."""
    Wf = W.float()
    scale = Wf.abs().mean(dim=1, keepdim=True).to(SCALE_DTYPE).float()  # (out, 1)
    codes = torch.where(Wf >= 0, 1, -1).to(torch.int8)
    return codes, scale


@torch.no_grad()
def binary_dequantize(codes: Tensor, scale: Tensor) -> Tensor:
    """``codes * scale`` in float32: ``(out, in)``."""
    return codes.float() * scale
