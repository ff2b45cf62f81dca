"""Drafts for speculative decoding (slimlm.generation.speculative), and the model runner they share.

- ``ModelDraft``: any causal LM with the target's tokenizer, run on its own KV cache: a smaller
  model of the family, or a copy of the target compressed by slimlm (``compressed_copy``:
  quantized with ``RTN``, any recipe, a bfloat16 cast).
- Self-speculative (``shallow_view``): the target's own first N blocks, final norm and lm_head,
  sharing the target's weights (early exit as the draft: Zhang et al. 2023, "Draft & Verify:
  Lossless LLM acceleration via self-speculative decoding", which skips chosen layers;
  Elhoushi et al. 2024, "LayerSkip", which exits after the first layers, as here).
- ``PromptLookupDraft``: no model at all; the tokens that followed the latest earlier occurrence
  of the context's last n-gram (Saxena 2023, "Prompt lookup decoding"). Deterministic: its
  proposals carry no probabilities (q is one-hot).

``make_draft("lookup" | "layers:8" | "int4" | "int8" | "bf16" | "<scheme>" | "recipe:<name>" |
"<model source>", target, tokenizer)`` parses the CLI's ``--draft`` once, here.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.generation.sampling import Sampling
from slimlm.generation.speculative import warped_probs
from slimlm.models.adapters import get_adapter, num_layers, text_config

log = logging.getLogger("slimlm.generation")


class DecoderRunner:
    """A model behind slimlm's decoder (``make_decoder``) and one KV cache: ``feed`` / ``crop`` / ``length``.

    The tokens fed are remembered, so a cache that runs out of room is rebuilt twice as large
    and refilled (the decoders' caches are pre-allocated).
    """

    def __init__(self, model: nn.Module, *, max_len: int = 512, fast: bool | None = None):
        from slimlm.generation.decoder import make_decoder

        self.decoder = make_decoder(model, fast=fast)
        self.max_len = max_len
        self.device = next(model.parameters()).device
        self.cache = self._new_cache()
        self.tokens: list[int] = []

    def _new_cache(self):
        cache = self.decoder.new_cache(1, self.max_len)
        if hasattr(cache, "enable_rollback"):  # HFCache: sliding-window layers must be able to roll back
            cache.enable_rollback()
        return cache

    @property
    def length(self) -> int:
        return len(self.tokens)

    def feed(self, tokens: Tensor, *, n_logits: int | None = None) -> Tensor:
        """(T,) token ids -> (T, V) logits (the last ``n_logits`` rows only, when given), appended to the cache."""
        if self.length + tokens.numel() > self.max_len:
            self._grow(self.length + tokens.numel())
        positions = torch.arange(self.length, self.length + tokens.numel(), device=self.device)  # (T,)
        logits = self.decoder(tokens.to(self.device)[None], positions[None], self.cache, n_logits=n_logits)
        self.tokens += tokens.tolist()
        return logits[0]  # (1, T or n_logits, V) -> (T or n_logits, V)

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise SlimlmError(f"cannot crop to {length} tokens; the cache holds {self.length}")
        self.cache.crop(length)  # also when nothing is removed: a sliding-window cache trims itself then
        del self.tokens[length:]

    def _grow(self, needed: int) -> None:
        kept = torch.tensor(self.tokens, dtype=torch.long)
        self.max_len = max(2 * self.max_len, needed)
        log.debug("KV cache refilled at %d slots", self.max_len)
        self.cache, self.tokens = self._new_cache(), []
        if kept.numel():
            self.feed(kept, n_logits=1)


@dataclass(frozen=True)
class DraftProposal:
    tokens: Tensor  # (k,) long
    probs: Tensor | None = None  # (k, V) float32, q of each token; None for a deterministic draft


def fit_vocab(logits: Tensor, vocab_size: int) -> Tensor:
    """Draft logits (..., V_d) on the target's vocabulary (V,): extra ids dropped, missing ids -inf."""
    extra = vocab_size - logits.shape[-1]
    if extra <= 0:
        return logits[..., :vocab_size]
    return torch.nn.functional.pad(logits, (0, extra), value=-float("inf"))


class ModelDraft:
    """A model (behind a Runner: ``feed`` / ``crop`` / ``length``) proposing k tokens autoregressively."""

    def __init__(self, runner: Any, *, vocab_size: int, name: str, cost: float):
        self.runner, self.vocab_size, self.name, self.cost = runner, vocab_size, name, cost

    def propose(self, context: Tensor, k: int, sampling: Sampling,
                generator: torch.Generator | None = None) -> DraftProposal:  # fmt: skip
        """k tokens after ``context`` (L,); the cache then holds the context and the first k-1 of them."""
        self.runner.crop(min(self.runner.length, context.numel() - 1))  # at least one token to read
        logits = self.runner.feed(context[self.runner.length:], n_logits=1)[-1]  # (V_d,) after the whole context
        tokens, probs = [], []
        for i in range(k):
            logits = fit_vocab(logits, self.vocab_size)
            if sampling.greedy:
                tokens.append(int(logits.argmax()))
            else:
                q = warped_probs(logits[None], sampling)[0]  # (V,) warped exactly as the target's p
                tokens.append(int(torch.multinomial(q, 1, generator=generator)))
                probs.append(q)
            if i < k - 1:
                logits = self.runner.feed(context.new_tensor(tokens[-1:]), n_logits=1)[-1]
        return DraftProposal(context.new_tensor(tokens), torch.stack(probs) if probs else None)

    def rollback(self, length: int) -> None:
        self.runner.crop(min(length, self.runner.length))  # it may hold fewer: the last draft is never fed


class PromptLookupDraft:
    """Propose what followed the most recent earlier occurrence of the context's last n-gram.

    n runs from ``max_ngram`` down to ``min_ngram``; the first n with a match wins. No model,
    no cache: costs nothing when there is no match (the round is then a plain step).
    """

    name = "lookup"
    cost = 0.0

    def __init__(self, *, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise SlimlmError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, context: Tensor, k: int, sampling: Sampling,
                generator: torch.Generator | None = None) -> DraftProposal:  # fmt: skip
        L = context.numel()
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            windows = context[:-1].unfold(0, n, 1)  # (L-n, n): every n-gram that has a successor
            hits = (windows == context[-n:]).all(-1).nonzero().flatten()  # start of each earlier match
            if hits.numel():
                start = int(hits[-1]) + n  # what followed the most recent match
                return DraftProposal(context[start:start + k].clone())
        return DraftProposal(context.new_empty(0))

    def rollback(self, length: int) -> None:
        return None


def shallow_view(model: nn.Module, n_layers: int) -> nn.Module:
    """The model with only its first ``n_layers`` decoder blocks, sharing every weight with it.

    The modules on the path to the block list are shallow copies (their own child dict and a
    config with ``n_layers`` layers); blocks, embeddings, final norm and lm_head are the
    target's own objects, so the view costs no memory.
    """
    adapter = get_adapter(model)
    total = num_layers(model.config)
    if not 1 <= n_layers < total:
        raise SlimlmError(f"a self-speculative draft needs 1 <= layers < {total} (the target's depth), got {n_layers}")
    config = copy.deepcopy(model.config)
    tcfg = text_config(config, adapter)
    setattr(tcfg, adapter.n_layers_attr, n_layers)
    if getattr(tcfg, "layer_types", None):
        tcfg.layer_types = list(tcfg.layer_types)[:n_layers]
    configs = {id(model.config): config, id(text_config(model.config, adapter)): tcfg}
    view = parent = _shallow(model, configs)
    *path, last = adapter.blocks.split(".")
    for name in path:
        child = _shallow(parent._modules[name], configs)
        parent._modules[name] = child
        parent = child
    parent._modules[last] = nn.ModuleList(list(parent._modules[last])[:n_layers])
    return view


def _shallow(module: nn.Module, configs: dict[int, Any]) -> nn.Module:
    """A copy of ``module`` holding the same parameters and children in a child table of its own."""
    new = copy.copy(module)
    new._modules = dict(module._modules)
    old = getattr(module, "config", None)
    if old is not None and id(old) in configs:
        new.config = configs[id(old)]
    return new


def decode_bytes(model: nn.Module) -> int:
    """Bytes of weights read to decode one token: every distinct parameter, buffer and packed
    weight, less the input embedding table unless lm_head shares it (a lookup reads one row)."""
    from slimlm.models.size import packed_storage, unique_tensors

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


# --draft shorthand -> how the target's copy is compressed
QUANT_ALIASES = {"int4": "int4-g64", "int8": "int8-channel-sym"}
CAST_ALIASES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
DRAFT_FORMS = "lookup[:N], layers:N, int4, int8, bf16, fp16, <scheme e.g. int4-g32>, recipe:<name>, <model source>"


def compressed_copy(model: nn.Module, what: str, tokenizer: Any = None, *, calib_samples: int = 32) -> nn.Module:
    """A compressed deep copy of ``model``: a dtype cast, RTN to a scheme (lm_head too), or a recipe
    (a calibrated one draws ``calib_samples`` sequences from wiki-v1's calibration split)."""
    from slimlm.api import apply, apply_all, calibration_ids, needs_calibration
    from slimlm.formats import parse_scheme
    from slimlm.quant.rtn import RTN
    from slimlm.targets import Targets

    draft = copy.deepcopy(model)
    if what in CAST_ALIASES:
        return draft.to(CAST_ALIASES[what])
    if what.startswith("recipe:"):
        from slimlm.recipe import load_recipe

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
    """A draft from the ``--draft`` shorthand (see ``DRAFT_FORMS``); a draft model loaded from a
    source must have the same vocabulary as ``tokenizer`` (not checked when it is None)."""
    from slimlm.formats import parse_scheme

    kind, _, arg = spec.partition(":")
    if kind == "lookup":
        return PromptLookupDraft(max_ngram=_int_arg(spec, arg, default=3))
    if kind == "layers":
        return model_draft(shallow_view(target, _int_arg(spec, arg)), target, name=spec)
    if kind == "recipe" or spec in QUANT_ALIASES or spec in CAST_ALIASES:
        return model_draft(compressed_copy(target, spec, tokenizer), target, name=spec)
    try:
        parse_scheme(spec)
    except SlimlmError:
        from slimlm.models import load_model

        draft, draft_tok = load_model(spec, dtype=next(target.parameters()).dtype)
        if tokenizer is not None:
            _check_tokenizers(tokenizer, draft_tok, spec)
        return model_draft(draft, target, name=spec)
    return model_draft(compressed_copy(target, spec), target, name=spec)


def _int_arg(spec: str, arg: str, default: int | None = None) -> int:
    if not arg and default is not None:
        return default
    if not arg.isdigit():
        raise SlimlmError(f"--draft {spec!r}: expected a whole number after ':'; forms: {DRAFT_FORMS}")
    return int(arg)
