"""Folding a trained LoRA (or DoRA, IA3) into its base linear, and what that costs on a quantized base.

Float base: peft's own merge, ``W <- W + (alpha / r) B A`` (DoRA: the
renormalised, rescaled weight; IA3: the scaled rows or columns), then the
wrapper is replaced by the base linear, so the model is a plain HF model
again with the same outputs up to float rounding (tested).

Quantized base: ``Q`` holds integer codes, so ``Q + BA`` has no exact home.
The default keeps the adapter beside the base (nothing to merge). With
``requantize`` the merged float weight ``dequant(Q) + s B A`` is rounded
again in the layer's scheme (RTN) and the KLD this costs, from the model
with the adapter beside the base to the requantized one on calibration
windows, is logged and returned for the run's JSON. A sparse base cannot
hold a dense ``BA`` at all and is refused.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.nn import QuantLinear, RuntimeModule
from slimlm.nn.runtime import replace_module

log = logging.getLogger("slimlm.peft")

KLD_SEQUENCES = 8  # calibration sequences the requantization KLD is measured on

__all__ = ["adapter_layers", "check_mergeable", "merge_lora", "mean_kld"]


def adapter_layers(model: nn.Module) -> dict[str, BaseTunerLayer]:
    """Full name -> every peft tuner layer (LoRA, DoRA, IA3) in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def check_mergeable(targets: dict[str, nn.Module], *, requantize: bool) -> None:
    """Refuse, before anything changes, a merge whose result the targets' format cannot hold."""
    for name, m in targets.items():
        if isinstance(m, RuntimeModule) and not isinstance(m, QuantLinear):
            raise SlimlmError(f"{name} is {type(m).__name__}: its format cannot hold a merged dense LoRA update; "
                              f"keep the adapter beside the base (merge: false)")  # fmt: skip
        if isinstance(m, QuantLinear) and not requantize:
            raise SlimlmError(f"{name} is quantized ({m.scheme!r}): merging changes its codes; set requantize: "
                              f"true to re-round and report the KLD it costs, or keep the adapter (merge: false)")


@torch.no_grad()
def mean_kld(ref_logits: Tensor, logits: Tensor) -> float:
    """Mean over tokens of KL(p_ref || p), both ``(B, T, V)``."""
    logp_ref = F.log_softmax(ref_logits.float(), dim=-1)
    logp = F.log_softmax(logits.float(), dim=-1)
    return (logp_ref.exp() * (logp_ref - logp)).sum(-1).mean().item()


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    return model(input_ids=ids, use_cache=False).logits  # (B, T, V)


@torch.no_grad()
def _requantized(layer: BaseTunerLayer) -> QuantLinear:
    """RTN of ``dequant(Q) + delta`` in the base's scheme (the merged weight's nearest grid point)."""
    base = layer.get_base_layer()
    W = base.dequantized_weight()  # (out, in) float32
    for adapter in layer.active_adapters:
        W = W + layer.get_delta_weight(adapter).float()
    dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=W.device)
    dense.weight.copy_(W)
    if base.bias is not None:
        dense.bias.copy_(base.bias)
    return QuantLinear.from_linear(dense, base.scheme, compute_dtype=base.compute_dtype)


@torch.no_grad()
def merge_lora(model: nn.Module, *, calib: Tensor | None = None, requantize: bool = False) -> dict[str, Any]:
    """Merge every peft layer into its base and unwrap it (in place); -> counts and, requantized, the KLD."""
    layers = adapter_layers(model)
    if not layers:
        raise SlimlmError("the model carries no LoRA/DoRA/IA3 adapter to merge")
    check_mergeable({n: m.get_base_layer() for n, m in layers.items()}, requantize=requantize)
    quantized = {n: m for n, m in layers.items() if isinstance(m.get_base_layer(), QuantLinear)}
    ids = None if calib is None or not quantized else calib[:KLD_SEQUENCES].to(model.device)  # (n, L)
    before = _logits(model, ids) if ids is not None else None
    for name, layer in layers.items():
        if name in quantized:
            replace_module(model, name, _requantized(layer))
        else:
            layer.merge()
            replace_module(model, name, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    report: dict[str, Any] = {"merged": len(layers) - len(quantized), "requantized": len(quantized)}
    if before is not None:
        report["kld"] = mean_kld(before, _logits(model, ids))
        log.info("merge: %d layers requantized after merging; KLD %.5f nats/token to the model with the adapter "
                 "beside the base (%d calibration sequences)", len(quantized), report["kld"], ids.shape[0])
    return report
