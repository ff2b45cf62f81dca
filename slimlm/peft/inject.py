"""Putting HF ``peft`` tuners (LoRA, DoRA, IA3) on a slimlm model, in place, float or quantized base.

The model stays the HF model it was (no ``PeftModel`` wrapper), so targets,
evaluation, the fast decoder and later recipe steps see the usual module
names; each target linear becomes peft's ``lora.Linear`` (or ``ia3.Linear``)
holding the original as ``base_layer``, which is what ``PeftModel`` builds
too, so the adapter's state dict and ``adapter_config.json`` are peft's own.

slimlm's runtime modules (:class:`~slimlm.nn.QuantLinear`, the sparse
linears) are registered with peft's custom module mechanism
(``LoraConfig._register_custom_module``) as :class:`RuntimeLoraLinear`:
peft's LoRA layer whose base runs the packed weight (dequantized in the
forward on the reference path while training) and which refuses peft's
in-place merge (there is no float weight to add to; :mod:`slimlm.peft.merge`
requantizes instead). One override of peft's ``LoraModel._replace_module``
is needed because peft finds the device of a new adapter from the base's
parameters, and a runtime module without bias has none (its packed tensors
are plain attributes).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft import IA3Config, LoraConfig
from peft.tuners.ia3 import IA3Model
from peft.tuners.lora import LoraModel
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.nn import RuntimeModule
from slimlm.peft.config import IA3, DoRA, LoRA
from slimlm.targets import select_linears

ADAPTER_NAME = "default"

__all__ = ["ADAPTER_NAME", "RuntimeLoraLinear", "SlimLoraModel", "check_rank", "inject", "peft_config_for", "seeded"]


class RuntimeLoraLinear(PeftLoraLinear):
    """peft's LoRA layer over a slimlm runtime module (registered as a peft custom module)."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise SlimlmError("a LoRA on a quantized base cannot be merged in place (the base holds integer codes): "
                          "use merge: true with requantize: true, which re-rounds and reports the KLD it costs")


class SlimLoraModel(LoraModel):
    """peft's LoRA tuner; a new adapter on a parameter-less QuantLinear goes to its packed weight's device."""

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        base = child.base_layer if hasattr(child, "base_layer") else child
        if isinstance(base, RuntimeModule) and next(base.parameters(), None) is None:
            setattr(parent, child_name, new_module)
            new_module.to(next(iter(base.state_dict().values())).device)
            return
        super()._replace_module(parent, child_name, new_module, child)


def check_rank(targets: dict[str, nn.Module], r: int) -> None:
    """Refuse a rank above ``min(in, out)`` of any target (a LoRA of that rank is a full update, and more)."""
    for name, m in targets.items():
        limit = min(m.in_features, m.out_features) if hasattr(m, "in_features") else min(m.weight.shape)
        if r > limit:
            raise SlimlmError(f"LoRA rank {r} exceeds min(in, out) = {limit} of {name}; use r <= {limit}")


def peft_config_for(model: nn.Module, config: Any) -> tuple[Any, list[str]]:
    """The peft config of a slimlm LoRA/DoRA/QLoRA/IA3 config on ``model`` and the target names it selects."""
    targets = select_linears(model, config.targets)
    names = list(targets)
    if isinstance(config, IA3):
        if compressed := sorted({type(m).__name__ for m in targets.values() if isinstance(m, RuntimeModule)}):
            raise SlimlmError(f"ia3 scales float linears only, not {', '.join(compressed)}; use lora / qlora on "
                              f"a compressed base")  # fmt: skip
        feedforward = [n for n in names if ".mlp." in n or n.endswith(("down_proj", "fc2", "c_proj"))]
        return IA3Config(target_modules=names, feedforward_modules=feedforward), names
    check_rank(targets, config.r)
    compressed = sorted({type(m).__name__ for m in targets.values() if isinstance(m, RuntimeModule)})
    if compressed and isinstance(config, DoRA):
        raise SlimlmError(f"DoRA needs float target weights (it normalises W + BA per row), not "
                          f"{', '.join(compressed)}; use lora / qlora on a compressed base, or put dora before "
                          f"the compression step")  # fmt: skip
    cfg = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=names,
                     use_dora=isinstance(config, DoRA))  # fmt: skip
    cfg._register_custom_module({RuntimeModule: RuntimeLoraLinear})
    return cfg, names


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """The global RNG seeded with ``seed`` inside and restored after: peft draws LoRA's ``A`` (and
    ``nn.Linear`` its initial weights) from it, so the adapter depends on the config's seed only."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if devices:  # never seed a CUDA that is not started: the seed would wait there and outlive the fork
            torch.cuda.manual_seed_all(seed)
        yield


def inject(model: nn.Module, config: LoRA | IA3) -> tuple[list[nn.Parameter], Any]:
    """Put the adapter on ``model`` in place, initialised from ``config.seed``; -> (the adapter's new
    parameters, the peft config)."""
    cfg, _ = peft_config_for(model, config)
    before = {id(p) for p in model.parameters()}
    with seeded(config.seed):
        if isinstance(cfg, IA3Config):
            IA3Model(model, cfg, ADAPTER_NAME)
        else:
            SlimLoraModel(model, cfg, ADAPTER_NAME)
    return [p for p in model.parameters() if id(p) not in before], cfg
