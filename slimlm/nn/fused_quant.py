"""Several :class:`QuantLinear` that read the same input, run as one quantized matmul.

At decode (one row) a layer's q/k/v and gate/up projections are small GEMVs
that do not reach memory bandwidth one by one; concatenated along the output
dimension they are one larger GEMV (q 576 + k 192 + v 192 rows on SmolLM2,
gate 1536 + up 1536). For an integer scheme with one scale (and zero) per row
or per group along the input, every stored tensor is row-wise: ``codes (out,
bytes)``, ``scale``/``zero (out, groups)``. So the portable tensors of the
parts concatenated on dim 0 are exactly the portable tensors of the stacked
weight ``[W_q; W_k; W_v]``, and ``x @ [W_q; W_k; W_v]^T = [x W_q^T, x W_k^T,
x W_v^T]`` column block by column block. Other schemes (per-tensor scales,
NF4's flat absmax blocks, k-means codebooks) and other modules (W8A8, sparse,
low-rank, compensated, subclasses) are not fused: :func:`fusable` says why.

Memory: the fused layout is prepared once by the parts' kernel; then each
part's own layout tensors that equal a row slice of the fused ones are
replaced by that slice (a view), so the weights are held once
(:meth:`PackedLinear.adopt_views`). Equality is checked, not assumed: torch's
CPU int4pack layout tiles rows in blocks (64 rows in torch 2.x), so the
packing of a concatenation is the concatenation of the packings only when
every part but the last fills whole blocks (true for SmolLM2's 576/192/1536
rows, not for a 32-row part); a part that does not match keeps its own copy.
The model's checkpoint is unchanged (it writes the portable tensors, now views).
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.errors import SlimlmError
from slimlm.formats.granularity import PerChannel, PerGroup
from slimlm.formats.scheme import IntScheme
from slimlm.kernels import Tensors
from slimlm.nn.packed import PackedLayout
from slimlm.nn.quant_linear import QuantLinear


def fusable(mods: list) -> str | None:
    """Why ``mods`` cannot run as one :class:`FusedQuantLinear`, or None when they can."""
    if len(mods) < 2 or any(type(m) is not QuantLinear for m in mods):
        return "not all parts are QuantLinear"
    first = mods[0]
    scheme = first.scheme
    if not (isinstance(scheme, IntScheme) and isinstance(scheme.granularity, (PerChannel, PerGroup))):
        return f"{scheme!r} is not an int scheme with per-row or per-group scales"
    for m in mods[1:]:
        if m.scheme != scheme or m.kernel is not first.kernel or m.in_features != first.in_features:
            return "the parts differ in scheme, kernel or in_features"
        if m.compute_dtype != first.compute_dtype or m.weight_device != first.weight_device:
            return "the parts differ in compute dtype or device"
    if any(m._extra for m in mods):
        return "a part stores extras beside its weight"
    shape = (sum(m.out_features for m in mods), first.in_features)
    if not first.kernel.supports(scheme, shape, first.weight_device):
        return f"{first.kernel.name} does not support the fused shape {shape}"
    return None


class FusedQuantLinear(PackedLayout):
    """``x (..., in) -> (..., sum out)``: the parts' outputs concatenated, by one kernel call.

    Not a module of the model (nothing is saved); it quacks like a runtime linear
    (``kernel``, ``scheme``, ``in_features``, ``out_features``, ``compute_dtype``,
    ``weight_device``) so :func:`slimlm.kernels.report.layer_kernel` can report it.
    """

    def __init__(self, mods: list[QuantLinear], *, share: bool = True) -> None:
        why = fusable(mods)
        if why is not None:
            raise SlimlmError(f"cannot fuse these linears: {why}; call them one by one (check fusable() first)")
        first = mods[0]
        self.kernel, self.scheme, self.compute_dtype = first.kernel, first.scheme, first.compute_dtype
        self.in_features = first.in_features
        self.out_features = sum(m.out_features for m in mods)
        self.splits = tuple(m.out_features for m in mods)
        parts = [m.portable_tensors() for m in mods]
        packed = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}  # each (sum out, ...)
        self._weight: Tensors = self.kernel.prepare(packed, self.scheme, self.shape, dtype=self.compute_dtype)
        self.bias = _cat_bias(mods)
        self.shared: dict[int, list[str]] = {}  # part index -> layout keys it now holds as views of ours
        if share:
            self.shared = {i: keys for i, keys in enumerate(self._share(mods)) if keys}

    def _share(self, mods: list[QuantLinear]) -> list[list[str]]:
        """Let each part hold the row slices of our layout that equal its own (see the module docstring)."""
        adopted, start = [], 0
        for m in mods:
            rows = {k: t[start:start + m.out_features] for k, t in self._weight.items()
                    if t.dim() >= 1 and t.shape[0] == self.out_features}  # fmt: skip
            adopted.append(m.adopt_views(rows))
            start += m.out_features
        return adopted

    def __call__(self, x: Tensor) -> Tensor:
        return self._matmul(x)  # (..., sum out)

    def __repr__(self) -> str:
        return (f"FusedQuantLinear(splits={self.splits}, in_features={self.in_features}, scheme={self.scheme!r}, "
                f"kernel={self.kernel.name})")  # fmt: skip


def _cat_bias(mods: list[QuantLinear]) -> Tensor | None:
    """The parts' biases concatenated (zeros for a part without one), or None when no part has one."""
    if all(m.bias is None for m in mods):
        return None
    dtype = next(m.bias for m in mods if m.bias is not None).dtype
    return torch.cat([m.bias.detach().to(dtype) if m.bias is not None
                      else torch.zeros(m.out_features, dtype=dtype, device=m.weight_device) for m in mods])  # fmt: skip
