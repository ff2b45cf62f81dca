"""Which linears a method touches, and swapping modules in place.

Targets are chosen by glob patterns on full module names
(``model.layers.3.mlp.down_proj``). By default every linear inside the
decoder blocks is a target; ``lm_head`` only when asked; embeddings never
(they are looked up, not multiplied, and stay in float).

``lm_head`` is ``False``, ``True`` (the step's own scheme) or a scheme
(``Targets(lm_head="int8-channel-sym")``: the output projection gets that
scheme, whatever the step's): weight-only quantization steps (rtn, gptq,
awq) take a scheme; every other step refuses one. Quantizing the head of a
model whose head shares the embedding table unties the two
(:func:`slimlm.nn.runtime.replace_module`): the embedding stays a float
lookup table, the head is stored once more in its quantized form. With
``embedding="shared"`` (those same steps) the embedding instead reads its
rows from the quantized head (:class:`slimlm.nn.SharedQuantEmbedding`): one
quantized table, as llama.cpp's ``token_embd``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.formats import Scheme, parse_scheme, scheme_to_dict
from slimlm.formats.scheme import SCHEME_TYPES
from slimlm.models.adapters import block_linears, decoder_blocks, get_adapter
from slimlm.nn.quant_embedding import tied_input_embedding
from slimlm.nn.quant_linear import linear_weight
from slimlm.nn.runtime import replace_module

__all__ = ["EMBEDDING_MODES", "Targets", "candidate_linears", "check_targets", "match_override", "replace_module",
           "scheme_plan", "select_linears", "shared_head"]


# What becomes of an input embedding tied to a quantized head: a float table beside the head ("float", the
# default), or a lookup into the head's quantized table ("shared").
EMBEDDING_MODES = ("float", "shared")


@dataclass(frozen=True)
class Targets:
    include: tuple[str, ...] = ()  # globs on full names; empty = every decoder-block linear
    exclude: tuple[str, ...] = ()
    lm_head: bool | Scheme = False  # a scheme: the head's own (YAML shorthand parsed here, once)
    embedding: str = "float"  # "shared": a tied embedding reads the quantized head's table (EMBEDDING_MODES)

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise SlimlmError(f"{name} must be a list of glob patterns like '*.mlp.down_proj', got {value!r}")
        if not isinstance(self.lm_head, bool):
            object.__setattr__(self, "lm_head", _head_scheme(self.lm_head))
        if self.embedding not in EMBEDDING_MODES:
            raise SlimlmError(f"embedding must be one of {', '.join(EMBEDDING_MODES)}, got {self.embedding!r}")
        if self.embedding == "shared" and not self.head:
            raise SlimlmError("embedding: shared reads the quantized lm_head's table: set lm_head too (e.g. "
                              "lm_head: int8-channel-sym)")  # fmt: skip

    @property
    def head(self) -> bool:
        """Whether the output projection is a target (with the step's scheme or its own)."""
        return self.lm_head is not False

    @property
    def head_scheme(self) -> Scheme | None:
        """The output projection's own scheme, or None (the step's scheme, or no head at all)."""
        return self.lm_head if isinstance(self.lm_head, SCHEME_TYPES) else None


def _head_scheme(value: object) -> Scheme:
    try:
        return parse_scheme(value)
    except SlimlmError as e:
        raise SlimlmError(f"lm_head must be true, false or a scheme such as int8-channel-sym: {e}") from None


def check_targets(targets: object, *, head_scheme: bool = False) -> None:
    """A config's ``targets`` field holds a :class:`Targets`; ``lm_head`` may name a scheme only where the
    step says it can quantize the head in a scheme of its own (``head_scheme=True``)."""
    if not isinstance(targets, Targets):
        raise SlimlmError(f"targets must be a Targets(...), got {targets!r}")
    if targets.head_scheme is not None and not head_scheme:
        raise SlimlmError(f"lm_head: {scheme_to_dict(targets.head_scheme)} (a scheme) is taken only by weight-only "
                          "quantization steps (rtn, gptq, awq); write lm_head: true or false in this step")
    if targets.embedding == "shared" and not head_scheme:
        raise SlimlmError("embedding: shared is taken only by weight-only quantization steps (rtn, gptq, awq); "
                          "drop it from this step")  # fmt: skip


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
    found = candidate_linears(model, lm_head=targets.head)
    chosen = {
        name: m
        for name, m in found.items()
        if (not targets.include or any(fnmatchcase(name, p) for p in targets.include)
            or (targets.head and name == get_adapter(model).lm_head))
        and not any(fnmatchcase(name, p) for p in targets.exclude)
    }  # fmt: skip
    if not chosen:
        example = next(iter(found), "model.layers.0.mlp.down_proj")
        raise SlimlmError(
            f"include={list(targets.include)} exclude={list(targets.exclude)} select no linear; "
            f"patterns match full names such as {example!r}"
        )
    return chosen


def scheme_plan(model: nn.Module, targets: Targets,
                scheme_for: Callable[[str], Scheme]) -> dict[str, tuple[nn.Module, Scheme]]:  # fmt: skip
    """Full name -> (linear, scheme) for the selected linears: the head's own scheme when ``targets.lm_head``
    names one (it wins over a step's overrides), else ``scheme_for(name)``."""
    head = get_adapter(model).lm_head
    return {name: (m, targets.head_scheme if name == head and targets.head_scheme is not None else scheme_for(name))
            for name, m in select_linears(model, targets).items()}  # fmt: skip


def shared_head(model: nn.Module, targets: Targets,
                plan: dict[str, tuple[nn.Module, Scheme]]) -> tuple[str, nn.Embedding] | None:  # fmt: skip
    """With ``embedding="shared"``: (the head's name, the float embedding tied to it), refused in one line
    before anything changes when the plan leaves the head out or the model cannot share; else None.
    After the head is quantized, ``nn.share_embedding(model, *shared)`` makes the swap."""
    if targets.embedding != "shared":
        return None
    head = get_adapter(model).lm_head
    if head not in plan:
        raise SlimlmError(f"embedding: shared reads the quantized {head}, which this step's exclude leaves out")
    return head, tied_input_embedding(model, head, plan[head][1])


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
