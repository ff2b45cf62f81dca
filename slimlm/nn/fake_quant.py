"""FakeQuantLinear: a training-time linear whose forward sees its weight quantized.

Used by quantization-aware training (:mod:`slimlm.quant.qat`): the module
keeps a float *latent* weight (the trained parameter) and multiplies by
``Q(W)``, the weight rounded to the scheme and back with the format's
reference functions. The gradient passes straight through the rounding
(STE). After training, :meth:`FakeQuantLinear.to_quant_linear` stores
``Q(W)`` in a real :class:`~slimlm.nn.QuantLinear`; because both use the same
reference quantizer, the converted layer computes the same weight exactly.

It is not a runtime module (checkpoints never hold it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimlm.formats import Scheme, fake_quantize, quantize
from slimlm.nn.quant_linear import QuantLinear, linear_weight


def ste_fake_quantize(W: Tensor, scheme: Scheme) -> Tensor:
    """``Q(W)`` in the forward pass, identity gradient: ``W + (Q(W) - W).detach()``.

    Bengio et al. 2013 (arXiv:1308.3432) straight-through estimator; the
    scale and zero point are recomputed from ``W`` at every call.
    """
    Wq = fake_quantize(W.detach(), scheme).to(W.dtype)  # (out, in), no graph
    return W + (Wq - W).detach()


class FakeQuantLinear(nn.Module):
    """``y = x @ Q(W)^T + b`` with a trainable latent float ``W (out, in)``."""

    def __init__(self, weight: Tensor, bias: Tensor | None, scheme: Scheme) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.scheme = scheme
        self.weight = nn.Parameter(weight.detach().clone().float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().float())
        self.dtype = weight.dtype

    @classmethod
    def from_linear(cls, linear: nn.Module, scheme: Scheme) -> FakeQuantLinear:
        """From an ``nn.Linear`` or a transformers ``Conv1D`` (stored as ``(out, in)`` here)."""
        W, bias = linear_weight(linear)
        return cls(W, bias, scheme)

    def quantized_weight(self) -> Tensor:
        """``Q(W)`` without a graph (float32, ``(out, in)``)."""
        return fake_quantize(self.weight.detach(), self.scheme)

    def forward(self, x: Tensor) -> Tensor:
        W = ste_fake_quantize(self.weight, self.scheme)  # (out, in)
        b = self.bias
        return F.linear(x, W.to(x.dtype), None if b is None else b.to(x.dtype))

    @torch.no_grad()
    def to_quant_linear(self) -> QuantLinear:
        """A real QuantLinear storing ``Q(W)`` of the trained latent weight, in the original dtype."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        dtype=self.dtype, device=self.weight.device)  # fmt: skip
        lin.weight.copy_(self.weight)
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        # codes from the float32 latent itself, so a low-precision dtype cannot change them
        return QuantLinear.from_linear(lin, self.scheme, qweight=quantize(self.weight.detach(), self.scheme))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme!r}"
