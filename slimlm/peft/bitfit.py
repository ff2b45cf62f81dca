"""BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning"): train biases only.

The paper trains every bias of a BERT. LLaMA-family linears have no bias, so
what trains there is a choice, and both are offered: the norm weights (which
scale the inputs of q/k/v and gate/up, the closest thing such a model has
to trainable offsets) always, plus either the biases the model has (none in
LLaMA) or, with ``zero_biases``, new zero biases on the target linears
(zero, so the model starts unchanged; they are then ordinary biases and save
with the model). peft has no BitFit tuner; this one is ours.
"""

from __future__ import annotations

import torch
from torch import nn

from slimlm.models.adapters import get_adapter
from slimlm.nn import RuntimeModule
from slimlm.targets import Targets, select_linears

__all__ = ["bitfit_parameters", "norm_modules"]


def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every norm (RMSNorm, LayerNorm: a class whose name ends in Norm) with a weight, by full name."""
    return {name: m for name, m in model.named_modules()
            if type(m).__name__.endswith("Norm") and isinstance(getattr(m, "weight", None), nn.Parameter)}  # fmt: skip


@torch.no_grad()
def bitfit_parameters(model: nn.Module, targets: Targets, *, zero_biases: bool) -> tuple[list[nn.Parameter], str]:
    """The parameters BitFit trains (adding zero biases first when asked) and a one-line summary."""
    linears = select_linears(model, targets)
    added = 0
    if zero_biases:
        for m in linears.values():
            if getattr(m, "bias", None) is None:
                out = m.out_features if hasattr(m, "out_features") else m.weight.shape[1]  # Conv1D: (in, out)
                ref = next(iter(m.state_dict().values()))
                dtype = ref.dtype if ref.is_floating_point() else getattr(m, "compute_dtype", torch.float32)
                m.bias = nn.Parameter(torch.zeros(out, dtype=dtype, device=ref.device))
                added += 1
    biases = [m.bias for m in linears.values() if isinstance(getattr(m, "bias", None), nn.Parameter)]
    norms = norm_modules(model)
    params = biases + [m.weight for m in norms.values()]
    params += [m.bias for m in norms.values() if isinstance(getattr(m, "bias", None), nn.Parameter)]
    n = sum(p.numel() for p in params)
    packed = sum(isinstance(m, RuntimeModule) for m in linears.values())
    summary = (f"{n} parameters: {len(biases)} linear biases ({added} added as zeros, {packed} on compressed "
               f"linears) and {len(norms)} norms ({get_adapter(model).family})")  # fmt: skip
    return params, summary
