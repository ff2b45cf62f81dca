"""W8A8Linear: int8 weights (per channel) times int8 activations (per token, at run time).

:class:`W8A8PerTensorLinear` is the same with one activation scale for the
whole activation matrix per call: the naive baseline that a few outlier
channels break. It is its own class (not a flag) so that a checkpoint's
module type alone says how to rebuild it.

The weight is ``IntScheme(8, symmetric=True, granularity=PerChannel())``;
each call quantizes the activations per token and multiplies in int8 with
int32 accumulation where the device has such a kernel (``torch._int_mm``),
as in LLM.int8() and SmoothQuant (Xiao et al. 2023, arXiv:2211.10438).

SmoothQuant moves activation outliers into the weights with a per-input-
channel vector ``s``: ``x @ W^T = (x / s) @ (W * s)^T``. ``from_linear``
takes ``s`` as ``smooth_scale``, quantizes ``W * s``, and divides the input
by ``s`` at run time -- unless ``divide_input=False`` says the caller has
already folded ``1 / s`` into the operation before (e.g. a norm's weight).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.formats import codec
from slimlm.formats.granularity import PerChannel
from slimlm.formats.scheme import IntScheme, Scheme
from slimlm.kernels import WeightKernel, select_w8a8_kernel
from slimlm.nn.packed import PackedLinear
from slimlm.nn.quant_linear import linear_weight, zero_packed

W8A8_WEIGHT_SCHEME = IntScheme(bits=8, symmetric=True, granularity=PerChannel())
SMOOTH_KEY = "smooth_scale"


def _check_scheme(scheme: Scheme | None) -> None:
    if scheme is not None and scheme != W8A8_WEIGHT_SCHEME:
        raise SlimlmError(f"W8A8 weights are {W8A8_WEIGHT_SCHEME!r}, got {scheme!r}")


class W8A8Linear(PackedLinear):
    """``y = quant(x / s) @ quant(W * s)^T + b`` with int8 x int8 -> int32 products."""

    act_granularity: ClassVar[str] = "token"  # one activation scale per token

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:  # fmt: skip
        super().__init__(in_features, out_features, W8A8_WEIGHT_SCHEME, bias=bias, dtype=dtype, device=device)

    def _select_kernel(self, device: torch.device) -> WeightKernel:
        return select_w8a8_kernel(self.scheme, self.shape, device, per_tensor=self.act_granularity == "tensor")

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Module, *, smooth_scale: Tensor | None = None,
                    divide_input: bool = True) -> W8A8Linear:  # fmt: skip
        """Quantize ``linear`` (``nn.Linear`` or ``Conv1D``), optionally smoothed by ``smooth_scale (in,)``."""
        W, bias = linear_weight(linear)  # (out, in)
        out_features, in_features = W.shape
        module = cls(in_features, out_features, bias=bias is not None, dtype=W.dtype, device=W.device)
        if smooth_scale is not None:
            s = smooth_scale.detach().to(device=W.device, dtype=torch.float32).reshape(-1)  # (in,)
            if s.numel() != in_features or not bool((s > 0).all()):
                raise SlimlmError(f"smooth_scale must be {in_features} positive values, got shape "
                                  f"{tuple(smooth_scale.shape)}")  # fmt: skip
            W = W.float() * s  # (out, in) * (in,): column j scaled by s_j
            if divide_input:
                module._extra = {SMOOTH_KEY: s}
        if bias is not None:
            module.bias.copy_(bias.detach())
        module._install(codec.pack(codec.quantize(W, W8A8_WEIGHT_SCHEME)))
        return module

    @classmethod
    def empty(cls, in_features: int, out_features: int, scheme: Scheme | None = None, *, bias: bool,
              smooth: bool = False, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> W8A8Linear:  # fmt: skip
        """A zero-weight shell (with a ``smooth_scale`` slot if ``smooth``); ``load_state_dict`` fills it.

        ``scheme`` is accepted (and checked) because checkpoints record it for every packed linear;
        a state dict holding a ``smooth_scale`` fills one even when ``smooth`` is False."""
        _check_scheme(scheme)
        module = cls(in_features, out_features, bias=bias, dtype=dtype, device=device)
        if smooth:
            module._extra = {SMOOTH_KEY: torch.ones(in_features, device=device)}
        reference = select_w8a8_kernel(module.scheme, module.shape, torch.device("cpu"), fast=False,
                                       per_tensor=cls.act_granularity == "tensor")  # fmt: skip
        module._install(zero_packed(module.scheme, module.shape, device), kernel=reference)
        return module

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001 -- torch's signature
        if prefix + SMOOTH_KEY in state_dict and SMOOTH_KEY not in self._extra:  # the manifest does not say
            self._extra = {SMOOTH_KEY: torch.ones(self.in_features, device=self.weight_device)}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        s = self._extra.get(SMOOTH_KEY)
        if s is not None:
            x = x / s.to(x.dtype)  # (..., in) / (in,)
        return self._matmul(x)


class W8A8PerTensorLinear(W8A8Linear):
    """W8A8 with one dynamic activation scale per call (``max |x| / 127`` over the whole input)."""

    act_granularity: ClassVar[str] = "tensor"


W8A8_CLASSES: dict[str, type[W8A8Linear]] = {"token": W8A8Linear, "tensor": W8A8PerTensorLinear}
