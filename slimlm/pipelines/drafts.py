"""Speculative drafts named by a shorthand, including compressed copies of the target.

Generation (:mod:`slimlm.generation.speculative`) runs any ready draft; this pipeline sits above
both generation and compression, so it may build a draft by compressing the target:

``make_draft("lookup" | "lookup:N" | "layers:N" | "int4" | "int8" | "bf16" | "fp16" | "<scheme>" |
"recipe:<name>" | "<model source>", target, tokenizer)`` parses the shorthand once, here (the CLI's
``--draft`` passes it through). Every model draft is priced by the bytes of weights it reads per
token relative to the target (``decode_bytes``), the first guess adaptive k works from.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from slimlm.api import apply, apply_all, needs_calibration
from slimlm.errors import SlimlmError
from slimlm.eval import calibration_ids
from slimlm.formats import parse_scheme
from slimlm.generation.speculative.drafts import ModelDraft, PromptLookupDraft
from slimlm.generation.speculative.runner import DecoderRunner
from slimlm.generation.speculative.shallow import shallow_view
from slimlm.models import load_model
from slimlm.models.size import packed_storage, unique_tensors
from slimlm.quant.rtn import RTN
from slimlm.recipe import load_recipe
from slimlm.targets import Targets

log = logging.getLogger("slimlm.pipelines")


def decode_bytes(model: nn.Module) -> int:
    """Bytes of weights read to decode one token: every distinct parameter, buffer and packed
    weight, less the input embedding table unless lm_head shares it (a lookup reads one row)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and embed.data_ptr() in {t.data_ptr() for t in (*head.parameters(), *head.buffers())}
    total = sum(t.numel() * t.element_size() for t in unique_tensors(model) if tied or t.data_ptr() != embed.data_ptr())
    return total + packed_storage(model)[1]


def model_draft(draft: nn.Module, target: nn.Module, *, name: str) -> ModelDraft:
    """A ModelDraft priced by the bytes it reads per token relative to the target."""
    cost = decode_bytes(draft) / decode_bytes(target)
    vocab = _out_features(target.get_output_embeddings())
    log.info("draft %s: %.2f of the target's bytes per token", name, cost)
    return ModelDraft(DecoderRunner(draft), vocab_size=vocab, name=name, cost=cost)


def _out_features(head: nn.Module) -> int:
    n = getattr(head, "out_features", None)  # nn.Linear and slimlm's runtime linears
    return int(n) if isinstance(n, int) else int(head.weight.shape[0])


# draft shorthand -> how the target's copy is compressed
QUANT_ALIASES = {"int4": "int4-g64", "int8": "int8-channel-sym"}
CAST_ALIASES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
DRAFT_FORMS = "lookup[:N], layers:N, int4, int8, bf16, fp16, <scheme e.g. int4-g32>, recipe:<name>, <model source>"


def compressed_copy(model: nn.Module, what: str, tokenizer: Any = None, *, calib_samples: int = 32) -> nn.Module:
    """A compressed deep copy of ``model``: a dtype cast, RTN to a scheme (lm_head too), or a recipe
    (a calibrated one draws ``calib_samples`` sequences from wiki-v1's calibration split)."""
    draft = copy.deepcopy(model)
    if what in CAST_ALIASES:
        return draft.to(CAST_ALIASES[what])
    if what.startswith("recipe:"):
        steps = list(load_recipe(what.removeprefix("recipe:")).steps)
        calib = None
        if needs_calibration(steps):
            if tokenizer is None:
                raise SlimlmError(f"draft {what}: a calibrated recipe needs the target's tokenizer")
            calib = calibration_ids(tokenizer, "wiki-v1", n_samples=calib_samples)
        return apply_all(draft, steps, calib)
    scheme = parse_scheme(QUANT_ALIASES.get(what, what))
    return apply(draft, RTN(scheme=scheme, targets=Targets(lm_head=True)))


def _check_tokenizers(target_tok: Any, draft_tok: Any, source: str) -> None:
    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise SlimlmError(f"draft model {source} has a different tokenizer from the target "
                          f"({len(draft_tok)} vs {len(target_tok)} tokens); a draft must share the target's vocabulary")


def make_draft(spec: str, target: nn.Module, tokenizer: Any) -> Any:
    """A draft from its shorthand ``spec`` (see ``DRAFT_FORMS``); a draft model loaded from a
    source must have the same vocabulary as ``tokenizer`` (not checked when it is None)."""
    kind, _, arg = spec.partition(":")
    if kind == "lookup":
        return PromptLookupDraft(max_ngram=_int_arg(spec, arg, default=3), name=spec)
    if kind == "layers":
        return model_draft(shallow_view(target, _int_arg(spec, arg)), target, name=spec)
    if kind == "recipe" or spec in QUANT_ALIASES or spec in CAST_ALIASES:
        return model_draft(compressed_copy(target, spec, tokenizer), target, name=spec)
    try:
        parse_scheme(spec)
    except SlimlmError:
        draft, draft_tok = load_model(spec, dtype=next(target.parameters()).dtype)
        if tokenizer is not None:
            _check_tokenizers(tokenizer, draft_tok, spec)
        return model_draft(draft, target, name=spec)
    return model_draft(compressed_copy(target, spec), target, name=spec)


def _int_arg(spec: str, arg: str, default: int | None = None) -> int:
    if not arg and default is not None:
        return default
    if not arg.isdigit():
        raise SlimlmError(f"draft {spec!r}: expected a whole number after ':'; forms: {DRAFT_FORMS}")
    return int(arg)
