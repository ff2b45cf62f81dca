"""Quantizing a pruned layer: the survivors are rounded, the zeros stay zeros.

A recipe may prune and then quantize (``wanda`` then ``rtn``/``gptq``). Both
quantizers hand a :class:`~slimlm.nn.SparseLinear` to these functions, which
keep its mask and store a :class:`~slimlm.nn.SparseQuantLinear` (kept codes,
positions, scales):

* RTN: the dense pruned weight is rounded as is; with an int scheme a zero
  rounds to exactly zero (symmetric: code 0; asymmetric: the integer zero
  point, see :mod:`slimlm.formats.affine`), so nothing to fix.
* GPTQ: its updates would spread each column's rounding error over the
  pruned weights of later columns and fill them in. A GPTQ step on a pruned
  layer therefore runs SparseGPT's solver with the layer's mask fixed
  (:func:`slimlm.prune.sparsegpt.sparsegpt_prune` with ``keep=``), which
  zeroes the pruned entries of every column and compensates that too, with
  GPTQ's grid, act-order and group settings.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.formats import PerGroup, Scheme, check_group_size, codec
from slimlm.nn.sparse_linear import SparseLinear, SparseQuantLinear, check_sparse_scheme
from slimlm.prune.patterns import Unstructured
from slimlm.prune.sparsegpt import sparsegpt_prune


@torch.no_grad()
def rtn_pruned(module: SparseLinear, scheme: Scheme) -> SparseQuantLinear:
    """Round a pruned layer's survivors to ``scheme`` (an int scheme), keeping its mask."""
    check_sparse_scheme(scheme)
    qweight = codec.quantize(module.dequantized_weight(), scheme)
    return SparseQuantLinear.from_quantized(module, qweight, module.keep_mask(), nm=module.nm)


@torch.no_grad()
def gptq_pruned(module: SparseLinear, H: Tensor, scheme: Scheme, *, blocksize: int = 128, percdamp: float = 0.01,
                act_order: bool = False, static_groups: bool = True) -> SparseQuantLinear:  # fmt: skip
    """GPTQ on a pruned layer: OBS rounding of the survivors with the mask fixed."""
    check_sparse_scheme(scheme)
    res = sparsegpt_prune(module.dequantized_weight(), H, 0.0, Unstructured(), scheme=scheme, keep=module.keep_mask(),
                          blocksize=blocksize, percdamp=percdamp, act_order=act_order,
                          static_groups=static_groups)  # fmt: skip
    return SparseQuantLinear.from_quantized(module, res.qweight, res.keep, nm=module.nm)


def check_pruned(plan: dict[str, tuple[nn.Module, Scheme]]) -> dict[str, tuple[nn.Module, Scheme]]:
    """Refuse a quantization plan's pruned layers that cannot keep their mask; return the other entries.

    A pruned layer needs an int scheme whose group size divides its input size and finite survivors.
    """
    rest = {}
    for name, (module, scheme) in plan.items():
        if not isinstance(module, SparseLinear):
            rest[name] = (module, scheme)
            continue
        check_sparse_scheme(scheme, name=name)
        if not torch.isfinite(module.dequantized_weight()).all():
            raise SlimlmError(f"{name} holds NaN/Inf weight(s); fix or reload the model before quantizing")
        if isinstance(scheme.granularity, PerGroup):
            try:
                check_group_size(module.in_features, scheme.granularity.size)
            except SlimlmError as e:
                raise SlimlmError(f"{name}: {e}") from None
    return rest
