"""QuantLinear: a weight-only quantized drop-in for ``nn.Linear`` (and GPT-2's ``Conv1D``).

Built by module swap::

    layer = QuantLinear.from_linear(model.mlp.down_proj, IntScheme(4, granularity=PerGroup(64)))

The weight is quantized once with :mod:`slimlm.formats` (or handed in
already quantized by GPTQ/AWQ), packed, and laid out for the fastest kernel
the device offers (:mod:`slimlm.kernels`); activations stay in their own
dtype and the output has the input's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from slimlm.errors import SlimlmError
from slimlm.formats import codec
from slimlm.formats.scheme import QuantizedWeight, Scheme
from slimlm.kernels import WeightKernel, select_weight_kernel
from slimlm.nn.packed import PackedLinear


def linear_weight(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(W (out, in), bias or None)`` of an ``nn.Linear`` or a transformers ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.weight.detach(), module.bias
    if isinstance(module, Conv1D):
        return module.weight.detach().t(), module.bias  # Conv1D stores (in, out)
    raise SlimlmError(f"expected a float nn.Linear or transformers Conv1D, got {type(module).__name__} (already "
                      "compressed): put this step before pruning/quantization in the recipe (rtn and gptq accept "
                      "pruned layers)")  # fmt: skip


def in_features_of(module: nn.Module) -> int:
    """Input size of an ``nn.Linear``, a runtime module or a transformers ``Conv1D`` (weight (in, out))."""
    return module.in_features if hasattr(module, "in_features") else module.weight.shape[0]


def zero_packed(scheme: Scheme, shape: tuple[int, int], device: torch.device | str | None) -> dict[str, Tensor]:
    """Zero tensors shaped and typed like ``codec.pack`` output for ``scheme`` and ``shape``."""
    meta = codec.pack(codec.quantize(torch.zeros(shape, device="meta"), scheme))
    return {k: torch.zeros(v.shape, dtype=v.dtype, device=device) for k, v in meta.items()}


class QuantLinear(PackedLinear):
    """``y = x @ W^T + b`` with ``W`` stored in a :mod:`slimlm.formats` scheme."""

    def _select_kernel(self, device: torch.device) -> WeightKernel:
        return select_weight_kernel(self.scheme, self.shape, device)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Module, scheme: Scheme, *, qweight: QuantizedWeight | None = None,
                    compute_dtype: torch.dtype | None = None) -> QuantLinear:  # fmt: skip
        """Quantize ``linear``'s weight in ``scheme`` (or take ``qweight``) and lay it out for its device."""
        W, bias = linear_weight(linear)  # (out, in)
        if qweight is None:
            qweight = codec.quantize(W, scheme)
        elif qweight.scheme != scheme or tuple(qweight.shape) != tuple(W.shape):
            raise SlimlmError(f"qweight is {qweight.scheme!r} of shape {tuple(qweight.shape)}; "
                              f"the layer needs {scheme!r} of shape {tuple(W.shape)}")  # fmt: skip
        out_features, in_features = W.shape
        dtype = compute_dtype or W.dtype
        module = cls(in_features, out_features, scheme, bias=bias is not None, dtype=dtype, device=W.device)
        if bias is not None:
            module.bias.copy_(bias.detach())
        module._install({k: v.to(W.device) for k, v in codec.pack(qweight).items()})
        return module

    @classmethod
    def empty(cls, in_features: int, out_features: int, scheme: Scheme, *, bias: bool,
              dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> QuantLinear:  # fmt: skip
        """A zero-weight shell of the right structure; ``load_state_dict`` fills it."""
        module = cls(in_features, out_features, scheme, bias=bias, dtype=dtype, device=device)
        # The reference layout of zeros is cheap; loading re-derives the real kernel's layout.
        module._install(zero_packed(scheme, module.shape, device), kernel=select_weight_kernel(
            scheme, module.shape, torch.device("cpu"), fast=False))  # fmt: skip
        return module

    def forward(self, x: Tensor) -> Tensor:
        return self._matmul(x)
