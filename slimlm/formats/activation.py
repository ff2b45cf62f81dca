"""Dynamic per-token symmetric quantization of activations (for W8A8).

Each row (token) of ``X (..., in)`` gets its own absmax scale at run time,
as in LLM.int8() (Dettmers et al. 2022) and SmoothQuant (Xiao et al. 2023).
Codes use the restricted symmetric range ``[-(2^(b-1)-1), 2^(b-1)-1]`` like
the weight format. Scales stay float32: they are computed per call, never
stored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.formats.affine import check_bits

_TINY = 1e-12


@torch.no_grad()
def quantize_per_token(X: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """``(codes int8 (..., in), scale float32 (..., 1))`` with ``X ≈ codes * scale``."""
    check_bits(bits)
    qmax = 2 ** (bits - 1) - 1
    Xf = X.float()
    scale = (Xf.abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=_TINY)  # (..., 1)
    codes = torch.round(Xf / scale).clamp(-qmax, qmax)
    return codes.to(torch.int8), scale


@torch.no_grad()
def dequantize_per_token(codes: Tensor, scale: Tensor) -> Tensor:
    """``codes * scale`` in float32, shaped like ``codes``."""
    return codes.float() * scale
