"""Pruned linears: drop-ins for ``nn.Linear`` (and GPT-2's ``Conv1D``) that store only kept weights.

* :class:`SparseLinear`: float kept values plus their positions (bitmask or
  N:M index, :mod:`slimlm.nn.sparse_format`).
* :class:`SparseQuantLinear`: kept weights as int codes (an
  :class:`~slimlm.formats.IntScheme`, e.g. SparseGPT 50% + int4-g64) plus
  positions, scales and zero points: the codes of pruned weights are not stored.

Built by module swap (``SparseLinear.from_linear(linear, keep)``), or as an
empty shell that ``load_state_dict`` fills (``empty(...)``). ``state_dict()``
holds only the stored form, so checkpoints shrink; the number of kept
weights may differ per layer and is read from the stored positions on load.
At run time the weight is decompressed once, when built or loaded, into the
layout of the kernel chosen for the device (:mod:`slimlm.kernels.sparse` for
float values; the int kernels of :mod:`slimlm.kernels` for quantized ones),
so on CPU a pruned model runs at the speed and memory of the dense (or dense
quantized) one. The stored tensors are plain attributes, as in
:class:`~slimlm.nn.PackedLinear`: a dtype cast of the model does not round them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.formats import IntScheme, QuantizedWeight, Scheme, codec
from slimlm.formats.packing import pack_bits, packed_length, unpack_bits
from slimlm.kernels import select_weight_kernel, weight_matmul
from slimlm.kernels.sparse import DenseSparse, select_sparse_kernel
from slimlm.nn.packed import PackedLinear
from slimlm.nn.quant_linear import linear_weight, zero_packed
from slimlm.nn.runtime import RuntimeModule
from slimlm.nn.sparse_format import NMPair, Tensors, decode_positions, encode_positions, pattern_of

_POSITION_KEYS = ("mask", "index")


def _nbytes(t: Tensors) -> int:
    return sum(v.numel() * v.element_size() for v in t.values())


def _read(state_dict: dict, prefix: str, names: tuple[str, ...], missing: list, errors: list) -> Tensors | None:
    """The module's stored tensors from ``state_dict`` (positions as mask or index); None if any is missing."""
    found: Tensors = {}
    for name in (*names, "pattern"):
        if prefix + name not in state_dict:
            missing.append(prefix + name)
            return None
        found[name] = state_dict[prefix + name].detach()
    layout = [k for k in _POSITION_KEYS if prefix + k in state_dict]
    if len(layout) != 1:
        errors.append(f"{prefix}: a pruned weight needs exactly one of {', '.join(_POSITION_KEYS)}, found {layout}")
        return None
    found[layout[0]] = state_dict[prefix + layout[0]].detach()
    return found


def _forget_unexpected(unexpected: list, prefix: str, names: tuple[str, ...]) -> None:
    ours = {prefix + n for n in (*names, "pattern", *_POSITION_KEYS)}
    unexpected[:] = [k for k in unexpected if k not in ours]


class SparseLinear(RuntimeModule):
    """``y = x @ W^T + b`` with ``W`` stored as kept float values and their positions.

    In memory the module holds the kernel's layout of the weight (on CPU: the dense pruned weight)
    and the positions; the kept values that ``state_dict()`` writes are read back from that layout,
    so a pruned model takes the dense model's memory plus its masks, not more.
    """

    _names = ("values",)

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = dtype
        self.kernel: DenseSparse | None = None
        self._positions: Tensors = {}  # pattern, mask|index (sparse_format)
        self._kept = 0
        self._weight: Tensors = {}  # the kernel's layout
        b = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        self.bias = nn.Parameter(b, requires_grad=False) if bias else None

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def weight_device(self) -> torch.device:
        return self.kernel.dense(self._weight).device

    @property
    def nm(self) -> NMPair:
        """``(n, m)`` of the N:M pattern, or None for unstructured."""
        return pattern_of(self._positions)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Module, keep: Tensor, *, nm: NMPair = None, weight: Tensor | None = None,
                    kernel: str | None = None) -> SparseLinear:  # fmt: skip
        """Keep ``linear``'s weights where ``keep (out, in)`` is True (``weight`` replaces them if given:
        SparseGPT's updated survivors), in the linear's dtype."""
        W, bias = linear_weight(linear)  # (out, in)
        if weight is not None:
            if weight.shape != W.shape:
                raise SlimlmError(f"weight {tuple(weight.shape)} does not match the layer's {tuple(W.shape)}")
            W = weight.to(W.dtype)
        if keep.shape != W.shape or keep.dtype != torch.bool:
            raise SlimlmError(f"keep must be a bool mask of shape {tuple(W.shape)}, got {keep.dtype} "
                              f"{tuple(keep.shape)}")  # fmt: skip
        module = cls(W.shape[1], W.shape[0], bias=bias is not None, dtype=W.dtype, device=W.device)
        if bias is not None:
            module.bias.copy_(bias.detach())
        keep = keep.to(W.device)
        dense = torch.where(keep, W, torch.zeros_like(W))  # +0.0 where pruned
        module._install(encode_positions(keep, nm), int(keep.sum()), dense, kernel=kernel)
        return module

    @classmethod
    def empty(cls, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> SparseLinear:  # fmt: skip
        """An all-pruned shell of the right structure; ``load_state_dict`` fills it."""
        module = cls(in_features, out_features, bias=bias, dtype=dtype, device=device)
        keep = torch.zeros(out_features, in_features, dtype=torch.bool, device=device)
        module._install(encode_positions(keep, None), 0, torch.zeros(module.shape, dtype=dtype, device=device))
        return module

    # --- layout ---------------------------------------------------------------

    def keep_mask(self) -> Tensor:
        """The keep-mask ``(out, in)`` bool."""
        return decode_positions(self._positions, self.shape)

    def _install(self, positions: Tensors, kept: int, dense: Tensor, *, kernel: str | None = None) -> None:
        """Adopt the positions and lay the dense pruned weight ``(out, in)`` out for the kernel."""
        self.kernel = select_sparse_kernel(pattern_of(positions), self.shape, dense.device, self.compute_dtype,
                                           name=kernel)  # fmt: skip
        self._positions, self._kept = positions, kept
        self._weight = self.kernel.prepare(dense, dtype=self.compute_dtype)

    def _install_stored(self, stored: Tensors) -> None:
        """Adopt a stored form (values + positions), validating the count."""
        positions = {k: v for k, v in stored.items() if k != "values"}
        keep = decode_positions(positions, self.shape)
        values = stored["values"]
        if values.shape != (int(keep.sum()),) or values.dtype != self.compute_dtype:
            raise SlimlmError(f"{values.dtype} values of shape {tuple(values.shape)} for {int(keep.sum())} kept "
                              f"{self.compute_dtype} weights; the checkpoint is damaged")  # fmt: skip
        dense = torch.zeros(self.shape, dtype=values.dtype, device=values.device).masked_scatter_(keep, values)
        self._install(positions, values.numel(), dense)

    def stored_tensors(self) -> Tensors:
        """What ``state_dict()`` writes besides the bias: kept values (row-major), positions, pattern."""
        return {"values": torch.masked_select(self.kernel.dense(self._weight), self.keep_mask()), **self._positions}

    def set_kernel(self, name: str | None) -> None:
        """Use the sparse kernel ``name`` (see :data:`slimlm.kernels.sparse.SPARSE_KERNELS`), or the default."""
        self._install(self._positions, self._kept, self.kernel.dense(self._weight), kernel=name)

    def dequantized_weight(self) -> Tensor:
        """The float32 dense weight ``(out, in)``, zeros where pruned."""
        return self.kernel.dense(self._weight).float()

    def weight_storage(self) -> tuple[int, int]:
        """``(number of weights, bytes)`` of the stored form: kept values, positions, pattern."""
        value_bytes = self._kept * torch.empty((), dtype=self.compute_dtype).element_size()
        return self.in_features * self.out_features, value_bytes + _nbytes(self._positions)

    @property
    def kept(self) -> int:
        return self._kept

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 -- torch's signature
        super()._apply(fn, recurse)
        dense = self.kernel.dense(self._weight)
        device = fn(torch.empty(0, device=dense.device)).device
        if device != dense.device:  # a chosen kernel stays if it runs there, else the new device's default
            stays = not self.kernel.is_reference and self.kernel.supports(
                pattern_of(self._positions), self.shape, device, self.compute_dtype)
            self._install({k: v.to(device) for k, v in self._positions.items()}, self._kept, dense.to(device),
                          kernel=self.kernel.name if stays else None)  # fmt: skip
        return self

    # --- state dict: the stored form -------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001 -- torch's signature
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, t in self.stored_tensors().items():
            destination[prefix + name] = t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # noqa: ANN001 -- torch's signature  # fmt: skip
        found = _read(state_dict, prefix, self._names, missing_keys, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)  # fmt: skip
        _forget_unexpected(unexpected_keys, prefix, self._names)
        if found is not None:
            device = self.kernel.dense(self._weight).device
            self._install_stored({k: v.to(device, copy=True) for k, v in found.items()})

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.kernel.is_reference:  # the dense cache: exactly nn.Linear on the pruned weight, bias fused
            return F.linear(x, self.kernel.dense(self._weight).to(x.dtype), bias)
        lead = x.shape[:-1]
        y = weight_matmul(self.kernel, x.reshape(-1, self.in_features), self._weight, None, self.shape)  # (M, out)
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, self.out_features)  # (..., out)

    @property
    def sparsity_label(self) -> str:
        """``"sparse 2:4"`` or ``"sparse 50%"`` (what ``slimlm info`` shows)."""
        return _label(self.nm, self.kept, self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.sparsity_label}, kernel={self.kernel.name}")  # fmt: skip


def _label(nm: NMPair, kept: int, total: int) -> str:
    return f"sparse {nm[0]}:{nm[1]}" if nm else f"sparse {1 - kept / total:.0%}"


def check_sparse_scheme(scheme: Scheme, *, name: str = "") -> None:
    """Refuse a scheme a pruned layer's survivors cannot be stored in."""
    if not isinstance(scheme, IntScheme):
        where = f"{name}: " if name else ""
        raise SlimlmError(f"{where}quantizing a pruned layer keeps its mask and needs an int scheme (int2..8, e.g. "
                          f"int4-g64), got {scheme!r}")  # fmt: skip


def _code_offset(s: IntScheme) -> int:
    return 2 ** (s.bits - 1) if s.symmetric else 0  # signed codes -> [1, 2^b - 1], as codec stores them


class SparseQuantLinear(PackedLinear):
    """A pruned linear whose kept weights are int codes: ``codes`` of kept weights only, positions,
    ``scale`` and ``zero`` as :mod:`slimlm.formats.codec` stores them for the dense weight."""

    _fixed = ("scale", "zero")

    def _select_kernel(self, device: torch.device) -> object:
        return select_weight_kernel(self.scheme, self.shape, device)

    @classmethod
    @torch.no_grad()
    def from_quantized(cls, linear: nn.Module, qweight: QuantizedWeight, keep: Tensor, *, nm: NMPair = None,
                       compute_dtype: torch.dtype | None = None) -> SparseQuantLinear:  # fmt: skip
        """Store ``qweight``'s codes where ``keep`` (pruned codes must encode 0.0) and ``linear``'s bias.
        ``linear`` may itself be a :class:`SparseLinear` (its bias and dtype are kept)."""
        check_sparse_scheme(qweight.scheme)
        bias = linear.bias
        if compute_dtype is None:
            compute_dtype = linear.compute_dtype if isinstance(linear, SparseLinear) else linear_weight(linear)[0].dtype
        out_f, in_f = qweight.shape
        module = cls(in_f, out_f, qweight.scheme, bias=bias is not None, dtype=compute_dtype, device=qweight.device)
        if bias is not None:
            module.bias.copy_(bias.detach())
        if bool((codec.dequantize(qweight)[~keep.to(qweight.device)] != 0).any()):
            raise SlimlmError("pruned weights must quantize to exactly 0 (their code must be the zero point)")
        module._install_sparse(cls._encode(qweight, keep.to(qweight.device), nm))
        return module

    @staticmethod
    def _encode(qw: QuantizedWeight, keep: Tensor, nm: NMPair) -> Tensors:
        s: IntScheme = qw.scheme
        packed = codec.pack(qw)  # dense form: codes, scale, zero
        kept_codes = qw.codes[keep].to(torch.int16) + _code_offset(s)  # (nnz,)
        stored = {"codes": pack_bits(kept_codes, s.bits), "scale": packed["scale"]}
        if "zero" in packed:
            stored["zero"] = packed["zero"]
        return {**stored, **encode_positions(keep, nm)}

    @classmethod
    def empty(cls, in_features: int, out_features: int, scheme: Scheme, *, bias: bool,
              dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> SparseQuantLinear:  # fmt: skip
        """An all-pruned shell; ``load_state_dict`` fills it."""
        check_sparse_scheme(scheme)
        module = cls(in_features, out_features, scheme, bias=bias, dtype=dtype, device=device)
        dense = zero_packed(scheme, module.shape, device)
        keep = torch.zeros(module.shape, dtype=torch.bool, device=device)
        stored = {"codes": torch.zeros(0, dtype=torch.uint8, device=device), "scale": dense["scale"]}
        if "zero" in dense:
            stored["zero"] = dense["zero"]
        module._install_sparse({**stored, **encode_positions(keep, None)})
        return module

    def _qweight(self, stored: Tensors) -> QuantizedWeight:
        """The dense QuantizedWeight: stored codes where kept, the code of 0.0 elsewhere."""
        s: IntScheme = self.scheme
        keep = decode_positions(stored, self.shape)
        nnz = int(keep.sum())
        if stored["codes"].shape != (packed_length(nnz, s.bits),):
            raise SlimlmError(f"{stored['codes'].numel()} code bytes for {nnz} kept {s.bits}-bit weights; "
                              "the checkpoint is damaged")  # fmt: skip
        scale = stored["scale"].float()
        zero = stored["zero"].float() if "zero" in stored else None
        ref = codec.unpack(zero_packed(s, self.shape, keep.device), s, self.shape)  # shapes and dtypes of codes
        codes = torch.zeros_like(ref.codes)
        if zero is not None:  # the zero point of each weight's group: dequantizes to exactly 0.0
            R, g = zero.shape
            codes = zero.unsqueeze(-1).expand(R, g, codes.numel() // (R * g)).reshape(self.shape).to(codes.dtype)
        kept = unpack_bits(stored["codes"], s.bits, nnz).to(torch.int16) - _code_offset(s)
        codes[keep] = kept.to(codes.dtype)
        return QuantizedWeight(s, self.shape, codes, scale=scale, zero=zero)

    def _install_sparse(self, stored: Tensors) -> None:
        dense = codec.pack(self._qweight(stored))
        self._sparse = stored
        self._install(dense)

    def keep_mask(self) -> Tensor:
        return decode_positions(self._sparse, self.shape)

    @property
    def nm(self) -> NMPair:
        return pattern_of(self._sparse)

    @property
    def kept(self) -> int:
        return int(self.keep_mask().sum())

    def portable_tensors(self) -> Tensors:
        return {**self._sparse, **self._extra}

    def weight_storage(self) -> tuple[int, int]:
        return self.in_features * self.out_features, _nbytes(self._sparse) + _nbytes(self._extra)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 -- torch's signature
        super()._apply(fn, recurse)
        device = self.weight_device
        self._sparse = {k: v.to(device) for k, v in self._sparse.items()}
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # noqa: ANN001 -- torch's signature  # fmt: skip
        names = ("codes", *(k for k in self._fixed if k in self._sparse))
        found = _read(state_dict, prefix, names, missing_keys, error_msgs)
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                        unexpected_keys, error_msgs)  # fmt: skip
        _forget_unexpected(unexpected_keys, prefix, names)
        if found is None:
            return
        for k in self._fixed:
            if k in found and (found[k].shape != self._sparse[k].shape or found[k].dtype != self._sparse[k].dtype):
                error_msgs.append(f"{prefix}{k}: expected {self._sparse[k].dtype} {tuple(self._sparse[k].shape)} "
                                  f"for {self.scheme!r}, got {found[k].dtype} {tuple(found[k].shape)}")  # fmt: skip
                return
        device = self.weight_device
        self._install_sparse({k: v.to(device, copy=True) for k, v in found.items()})

    def forward(self, x: Tensor) -> Tensor:
        return self._matmul(x)

    @property
    def sparsity_label(self) -> str:
        return _label(self.nm, self.kept, self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.sparsity_label}"
