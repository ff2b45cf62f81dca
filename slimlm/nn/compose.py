"""Quantizing a pruned layer (the survivors are rounded, the zeros stay zeros), and refusing a quantization plan.

A recipe may prune and then quantize (``wanda`` then ``rtn``/``gptq``), and
SparseGPT may prune and round in one pass. Quantizers hand a
:class:`~slimlm.nn.SparseLinear` to these constructors, which keep its mask
and build a :class:`~slimlm.nn.SparseQuantLinear` (kept codes, positions,
scales):

* RTN: the dense pruned weight is rounded as is; with an int scheme a zero
  rounds to exactly zero (symmetric: code 0; asymmetric: the integer zero
  point, see :mod:`slimlm.formats.affine`), so nothing to fix.
* GPTQ: its updates would spread each column's rounding error over the
  pruned weights of later columns and fill them in. A GPTQ step on a pruned
  layer therefore runs the OBS solve with the layer's mask fixed
  (:func:`slimlm.solvers.solve_with_mask`), which zeroes the pruned entries
  of every column and compensates that too, with GPTQ's grid, act-order and
  group settings.

:func:`check_schemes` is the one up-front refusal every quantizer (and
SparseGPT's joint mode) runs on its plan before touching a layer. A layer
already quantized (any :class:`~slimlm.nn.packed.PackedLinear`: RTN, GPTQ,
AWQ, W8A8, SparseGPT's joint codes) is refused, never skipped and never
re-rounded from its dequantized values: a recipe with two quantization
steps over the same linears, or a quantizer run on a loaded quantized
checkpoint, stops there with the model as the first step left it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.formats import PerGroup, Scheme, check_group_size, codec
from slimlm.nn.packed import PackedLinear
from slimlm.nn.quant_linear import in_features_of
from slimlm.nn.sparse_linear import SparseLinear, SparseQuantLinear, check_sparse_scheme
from slimlm.solvers import solve_with_mask

Plan = dict[str, tuple[nn.Module, Scheme]]  # full linear name -> (module, scheme it gets)


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
    res = solve_with_mask(module.dequantized_weight(), H, module.keep_mask(), scheme=scheme, blocksize=blocksize,
                          percdamp=percdamp, act_order=act_order, static_groups=static_groups)  # fmt: skip
    return SparseQuantLinear.from_quantized(module, res.qweight, res.keep, nm=module.nm)


def _check_group(name: str, n_in: int, scheme: Scheme) -> None:
    gran = getattr(scheme, "granularity", None)
    if isinstance(gran, PerGroup):
        try:
            check_group_size(n_in, gran.size)
        except SlimlmError as e:
            raise SlimlmError(f"{name}: {e}") from None


def check_pruned(plan: Plan) -> Plan:
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
        _check_group(name, module.in_features, scheme)
    return rest


def check_schemes(plan: Plan) -> None:
    """Refuse the whole plan before touching anything: a group size that does not fit,
    or a weight holding NaN or Inf (rounding would spread it through its group)."""
    plan = check_pruned(plan)  # pruned layers (SparseLinear, no .weight) are checked there, the others here
    for name, (module, scheme) in plan.items():
        if isinstance(module, PackedLinear):  # never re-round: the codes' dequantized values are not the weights
            raise SlimlmError(f"{name} is already quantized ({type(module).__name__}); a second quantization step "
                              f"would round rounded weights: drop one of the steps, or exclude it (exclude: "
                              f"['{name}'])")  # fmt: skip
        if not isinstance(getattr(module, "weight", None), torch.Tensor):  # e.g. a LowRankLinear's two factors
            raise SlimlmError(f"{name} is a {type(module).__name__} (already compressed, no single weight to "
                              f"quantize); exclude it (exclude: ['{name}']) or drop the step that made it")  # fmt: skip
        # A lazily loaded block's weight is still on disk (meta); it is checked when read (slimlm.models.lazy).
        if not module.weight.is_meta and not torch.isfinite(module.weight).all():
            bad = int((~torch.isfinite(module.weight)).sum())
            raise SlimlmError(f"{name} holds {bad} NaN/Inf weight(s); fix or reload the model before quantizing")
        _check_group(name, in_features_of(module), scheme)
