"""Ternary weights: per-row ``{-a, 0, +a}``.

Li, Zhang, Liu. "Ternary Weight Networks", 2016 (arXiv:1605.04711): the
threshold ``delta = 0.7 * mean|W|`` approximately minimises the L2 error
for roughly Gaussian or uniform weights, and given the kept set the optimal
scale is ``a = mean |W|`` over the kept weights. Ma et al. "The Era of
1-bit LLMs: All Large Language Models are in 1.58 Bits" (BitNet b1.58,
arXiv:2402.17764) trains LLMs natively with such ``{-1, 0, 1}`` weights
(its absmean rounding is the ``threshold=0.5`` rule with scale ``mean|W|``).

Codes are int8 in ``{-1, 0, 1}``; the scale is one float16 per row. Five
trits pack into a byte (base 3): 1.6 bits per weight plus the scale.
"""

from __future__ import annotations

import torch
from torch import Tensor

SCALE_DTYPE = torch.float16


@torch.no_grad()
def ternary_quantize(W: Tensor, *, threshold: float = 0.7) -> tuple[Tensor, Tensor]:
    """``(codes int8 (out, in) in {-1,0,1}, scale float32 (out, 1))`` for ``W (out, in)``.

    Weights with ``|w| <= threshold * mean_row|W|`` become 0; the scale is
    the mean ``|w|`` of the rest (float16-exact; 0 for a row with none kept).
    """
    A = W.float().abs()  # (out, in)
    delta = threshold * A.mean(dim=1, keepdim=True)  # (out, 1)
    keep = A > delta  # (out, in)
    kept = keep.sum(dim=1, keepdim=True).clamp(min=1)  # (out, 1)
    scale = ((A * keep).sum(dim=1, keepdim=True) / kept).to(SCALE_DTYPE).float()
    codes = torch.sign(W.float()) * keep
    return codes.to(torch.int8), scale


@torch.no_grad()
def ternary_dequantize(codes: Tensor, scale: Tensor) -> Tensor:
    """``codes * scale`` in float32: ``(out, in)`` from codes ``(out, in)`` and scale ``(out, 1)``."""
    return codes.float() * scale
