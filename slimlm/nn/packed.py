"""Shared machinery of linears whose weight lives in a packed, kernel-chosen layout.

A :class:`PackedLinear` holds its weight as a dict of tensors in the layout
of the kernel chosen for its device (``slimlm.kernels``), plus a bias
parameter. The layout is a private detail; what ``state_dict()`` writes is
always the portable packed form of :mod:`slimlm.formats.codec` (keys such as
``codes``, ``scale``, ``zero``), and ``load_state_dict`` re-derives the
kernel layout from it. So checkpoints do not depend on the device or kernel.

The packed tensors are plain attributes, not registered buffers, because a
dtype cast of the model (``model.to(torch.bfloat16)``) must not round the
float16 scales; :meth:`_apply` moves them when the device changes, and
re-derives the kernel layout for the new device.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from slimlm.formats.scheme import Scheme
from slimlm.kernels import REFERENCE, Tensors, WeightKernel, weight_matmul
from slimlm.nn.runtime import RuntimeModule

log = logging.getLogger("slimlm.nn")


def _nbytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _whole(t: Tensor) -> Tensor:
    """``t``, or a copy when it is a view into a larger storage (a fused copy's rows, see ``adopt_views``):
    safetensors refuses to save a view that does not cover its storage."""
    return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t


class PackedLayout:
    """What a linear held in a kernel's layout computes with: ``kernel``, ``scheme``, ``_weight`` (the
    layout tensors), ``bias``, ``in_features``, ``out_features`` (set by the class using it)."""

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def weight_device(self) -> torch.device:
        return next(iter(self._weight.values())).device

    def _matmul(self, x: Tensor) -> Tensor:
        """``x (..., in) -> (..., out)`` in ``x.dtype`` through the kernel, plus the bias."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        y = weight_matmul(self.kernel, x2, self._weight, self.scheme, self.shape)  # (M, out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)  # (..., out)


class PackedLinear(PackedLayout, RuntimeModule):
    """Base of :class:`QuantLinear` and :class:`W8A8Linear` (not used directly)."""

    def __init__(self, in_features: int, out_features: int, scheme: Scheme, *, bias: bool,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme = scheme
        self.compute_dtype = dtype
        self.kernel: WeightKernel = REFERENCE
        self._weight: Tensors = {}
        self._extra: Tensors = {}  # stored beside the weight (e.g. a smoothing vector)
        self._packed_bytes = 0
        b = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        self.bias = nn.Parameter(b, requires_grad=False) if bias else None

    # --- what subclasses decide -------------------------------------------

    def _select_kernel(self, device: torch.device) -> WeightKernel:
        raise NotImplementedError

    # --- layout ---------------------------------------------------------

    def _install(self, packed: Tensors, *, kernel: WeightKernel | None = None) -> None:
        """Lay out portable ``packed`` tensors for the kernel of their device."""
        device = next(iter(packed.values())).device
        self.kernel = kernel or self._select_kernel(device)
        self._packed_bytes = _nbytes(packed)
        self._weight = self.kernel.prepare(packed, self.scheme, self.shape, dtype=self.compute_dtype)

    def set_weight_kernel(self, kernel: WeightKernel | None) -> None:
        """Lay the same weight out for ``kernel`` (None: the default choice for its device).

        Training through a quantized layer needs a path with a backward: the
        fast int4/int8 kernels have none, the reference (dequantize, then
        ``F.linear``) has one for the input."""
        packed = self.kernel.portable(self._weight, self.scheme, self.shape)
        self._install(packed, kernel=kernel)

    def adopt_views(self, views: Tensors) -> list[str]:
        """Replace each layout tensor equal (shape, dtype, values) to ``views[key]`` by it; the adopted keys.

        For a fused copy of several layers (``slimlm.nn.fused_quant``): the weight is then held once,
        in the fused tensors, and this layer's results are unchanged because the values are."""
        adopted = []
        for key, view in views.items():
            own = self._weight.get(key)
            if own is not None and own.shape == view.shape and own.dtype == view.dtype and torch.equal(own, view):
                self._weight[key] = view
                adopted.append(key)
        return adopted

    def portable_tensors(self) -> Tensors:
        """The checkpoint content besides the bias: portable packed weight and extras."""
        return {**self.kernel.portable(self._weight, self.scheme, self.shape), **self._extra}

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 -- torch's signature
        super()._apply(fn, recurse)
        if not self._weight:
            return self
        device = fn(torch.empty(0, device=self.weight_device)).device  # where fn sends tensors
        if device != self.weight_device:
            packed = {k: v.to(device) for k, v in self.kernel.portable(self._weight, self.scheme, self.shape).items()}
            self._extra = {k: v.to(device) for k, v in self._extra.items()}
            self._install(packed)
        return self

    # --- state dict: always the portable form ------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001 -- torch's signature
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, t in self.portable_tensors().items():
            destination[prefix + name] = _whole(t if keep_vars else t.detach())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # noqa: ANN001 -- torch's signature  # fmt: skip
        expected = self.portable_tensors()
        loaded: Tensors = {}
        for name, ref in expected.items():
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            t = state_dict[key]
            if t.shape != ref.shape or t.dtype != ref.dtype:
                error_msgs.append(f"{key}: expected {ref.dtype} {tuple(ref.shape)} for {self.scheme!r}, "
                                  f"got {t.dtype} {tuple(t.shape)}")  # fmt: skip
                continue
            loaded[name] = t.detach().to(ref.device, copy=True)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)  # fmt: skip
        ours = {prefix + name for name in expected}
        unexpected_keys[:] = [k for k in unexpected_keys if k not in ours]
        if len(loaded) == len(expected):
            self._extra = {k: loaded.pop(k) for k in self._extra}
            self._install(loaded)

    # --- compute and accounting ---------------------------------------------

    def dequantized_weight(self) -> Tensor:
        """The float32 weight ``(out, in)`` the packed tensors stand for."""
        return self.kernel.dequantize(self._weight, self.scheme, self.shape)

    def dequantized_rows(self, ids: Tensor) -> Tensor:
        """Rows ``ids`` (1-D int64, on the weight's device) of :meth:`dequantized_weight`, ``(n, in)``
        float32, bit for bit, read from those rows alone (a tied embedding's lookup)."""
        return self.kernel.dequantize_rows(self._weight, self.scheme, self.shape, ids)

    def weight_storage(self) -> tuple[int, int]:
        """``(number of weights, bytes)`` of the stored form: codes, scales, zeros,
        codebooks and extras such as a smoothing vector -- not the bias, not the
        kernel's private layout."""
        return self.in_features * self.out_features, self._packed_bytes + _nbytes(self._extra)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme!r}, kernel={self.kernel.name}")  # fmt: skip
