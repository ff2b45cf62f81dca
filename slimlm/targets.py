"""Which linears a method touches, and swapping modules in place.

Targets are chosen by glob patterns on full module names
(``model.layers.3.mlp.down_proj``). By default every linear inside the
decoder blocks is a target; ``lm_head`` only when asked; embeddings never
(they are looked up, not multiplied, and stay in float).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.models.adapters import block_linears, decoder_blocks, get_adapter
from slimlm.nn.quant_linear import linear_weight
from slimlm.nn.runtime import replace_module

__all__ = ["Targets", "candidate_linears", "check_targets", "match_override", "replace_module", "select_linears"]


@dataclass(frozen=True)
class Targets:
    include: tuple[str, ...] = ()  # globs on full names; empty = every decoder-block linear
    exclude: tuple[str, ...] = ()
    lm_head: bool = False

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise SlimlmError(f"{name} must be a list of glob patterns like '*.mlp.down_proj', got {value!r}")


def check_targets(targets: object) -> None:
    """A config's ``targets`` field holds a :class:`Targets`."""
    if not isinstance(targets, Targets):
        raise SlimlmError(f"targets must be a Targets(...), got {targets!r}")


def candidate_linears(model: nn.Module, *, lm_head: bool = False) -> dict[str, nn.Module]:
    """Full name -> linear for every decoder-block linear (and lm_head if asked), in model order."""
    adapter = get_adapter(model)
    found: dict[str, nn.Module] = {}
    for i, block in enumerate(decoder_blocks(model)):
        for rel, module in block_linears(block, adapter).items():
            found[f"{adapter.blocks}.{i}.{rel}"] = module
    if lm_head:
        found[adapter.lm_head] = model.get_submodule(adapter.lm_head)
    return found


def select_linears(model: nn.Module, targets: Targets) -> dict[str, nn.Module]:
    """The linears ``targets`` selects; refuses a selection that matches nothing."""
    found = candidate_linears(model, lm_head=targets.lm_head)
    chosen = {
        name: m
        for name, m in found.items()
        if (not targets.include or any(fnmatchcase(name, p) for p in targets.include)
            or (targets.lm_head and name == get_adapter(model).lm_head))
        and not any(fnmatchcase(name, p) for p in targets.exclude)
    }  # fmt: skip
    if not chosen:
        example = next(iter(found), "model.layers.0.mlp.down_proj")
        raise SlimlmError(
            f"include={list(targets.include)} exclude={list(targets.exclude)} select no linear; "
            f"patterns match full names such as {example!r}"
        )
    return chosen


def match_override(name: str, overrides: tuple[tuple[str, object], ...]) -> object | None:
    """The value of the first (glob, value) pair whose glob matches ``name``."""
    for pattern, value in overrides:
        if fnmatchcase(name, pattern):
            return value
    return None


def float_linears(model: nn.Module, targets: Targets, *, compressed_fix: str, action: str) -> dict[str, nn.Module]:
    """The target linears, refused up front (one line) if any is already compressed or holds NaN/Inf.

    ``compressed_fix`` says what to do about an already-compressed one ("prune before quantizing ...");
    ``action`` names the method's work in the NaN/Inf refusal ("pruning").
    """
    plan = select_linears(model, targets)
    for name, module in plan.items():
        try:
            W, _ = linear_weight(module)
        except SlimlmError:
            raise SlimlmError(f"{name} is already a {type(module).__name__}; {compressed_fix}") from None
        # A lazily loaded block's weight is still on disk (meta); it is checked when read (slimlm.models.lazy).
        if not W.is_meta and not torch.isfinite(W).all():
            raise SlimlmError(f"{name} holds NaN/Inf weight(s); fix or reload the model before {action}")
    return plan
