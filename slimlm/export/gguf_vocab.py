"""The tokenizer as GGUF metadata: the ``tokenizer.*`` keys llama.cpp reads.

Written the way llama.cpp's ``convert_hf_to_gguf.py`` writes a byte-level BPE vocabulary
(``tokenizer.ggml.model = "gpt2"``): one entry per embedding row, in id order, spelled as
the tokenizer spells it (byte-level symbols such as ``Ġthe``); ids the tokenizer does not
use become ``[PAD<id>]`` of type UNUSED; added tokens are CONTROL when special, USER_DEFINED
otherwise; merges as ``"left right"`` strings. llama.cpp picks its pre-tokenizer (the regex
that splits text before the merges) by name, ``tokenizer.ggml.pre``: we derive the name
from the tokenizer's own pre-tokenizer and refuse one we cannot name, since a wrong split
gives wrong ids silently. Whether BOS/EOS are added is read from what the tokenizer does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gguf import GGUFWriter, TokenType

from slimlm.errors import SlimlmError

# llama.cpp pre-tokenizer names, keyed by the tokenizers-library pre_tokenizer JSON they implement.
_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}  # GPT-2's split regex
_PRE_TOKENIZERS: tuple[tuple[str, Any], ...] = (
    ("gpt-2", _BYTE_LEVEL),  # llama.cpp spells this one with a hyphen
    ("smollm", {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]}),
)
SUPPORTED = "byte-level BPE with a ByteLevel pre-tokenizer (llama.cpp 'gpt-2') or Digits + ByteLevel ('smollm')"


@dataclass(frozen=True)
class GGUFVocab:
    """Everything the ``tokenizer.*`` keys hold."""

    pre: str
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]
    special_ids: dict[str, int]  # "bos" | "eos" | "unk" | "pad" -> id
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def _matches(spec: Any, pattern: Any) -> bool:
    """``spec`` (tokenizer JSON) has every key of ``pattern`` with a matching value."""
    if isinstance(pattern, dict):
        return isinstance(spec, dict) and all(_matches(spec.get(k), v) for k, v in pattern.items())
    if isinstance(pattern, list):
        return isinstance(spec, list) and len(spec) == len(pattern) and all(map(_matches, spec, pattern))
    return spec == pattern


def _pre_name(backend: dict[str, Any]) -> str:
    model = backend.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or backend.get("normalizer") is not None:
        raise SlimlmError(f"the tokenizer is {model.get('type')} (byte_fallback={model.get('byte_fallback')}, "
                          f"normalizer={backend.get('normalizer')}); GGUF export supports {SUPPORTED}")  # fmt: skip
    for name, pattern in _PRE_TOKENIZERS:
        if _matches(backend.get("pre_tokenizer"), pattern):
            return name
    raise SlimlmError(f"the tokenizer's pre-tokenizer {json.dumps(backend.get('pre_tokenizer'))} has no llama.cpp "
                      f"name slimlm knows; GGUF export supports {SUPPORTED}")  # fmt: skip


def _merge_string(pair: Any) -> str:
    if isinstance(pair, str):
        return pair
    # newer tokenizers store pairs; a space inside a part is written as U+0120 + 256 as llama.cpp reads it
    return " ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)


def _tokens(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    by_id = {i: tok for tok, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise SlimlmError(f"the tokenizer has token id {max(by_id)} but the model embeds only {vocab_size} tokens; "
                          "fix the tokenizer or the checkpoint")  # fmt: skip
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        elif i in added:
            tokens.append(added[i].content)
            types.append(int(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED))
        else:
            tokens.append(by_id[i])
            types.append(int(TokenType.NORMAL))
    return tokens, types


def vocab_from_tokenizer(tokenizer: Any, vocab_size: int) -> GGUFVocab:
    """The GGUF vocabulary of a transformers fast tokenizer for a model with ``vocab_size`` embedding rows."""
    backend_tok = getattr(tokenizer, "backend_tokenizer", None)
    if backend_tok is None:
        raise SlimlmError(f"the checkpoint's tokenizer is {type(tokenizer).__name__}, not a fast (tokenizers) one; "
                          f"GGUF export supports {SUPPORTED}")  # fmt: skip
    backend = json.loads(backend_tok.to_str())
    pre = _pre_name(backend)
    tokens, types = _tokens(tokenizer, vocab_size)
    merges = tuple(_merge_string(p) for p in backend["model"].get("merges") or ())
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id}  # fmt: skip
    special_ids = {k: int(v) for k, v in ids.items() if v is not None}
    sample = tokenizer("a").input_ids  # what the tokenizer adds around a text is what llama.cpp must add
    add_bos = "bos" in special_ids and sample[:1] == [special_ids["bos"]]
    add_eos = "eos" in special_ids and len(sample) > 1 and sample[-1:] == [special_ids["eos"]]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return GGUFVocab(pre=pre, tokens=tuple(tokens), token_types=tuple(types), merges=merges,
                     special_ids=special_ids, add_bos=add_bos, add_eos=add_eos,
                     chat_template=template if isinstance(template, str) else None)  # fmt: skip


def add_vocab(writer: GGUFWriter, vocab: GGUFVocab) -> None:
    """Write ``vocab`` as llama.cpp's ``tokenizer.*`` keys."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(list(vocab.tokens))
    writer.add_token_types(list(vocab.token_types))
    writer.add_token_merges(list(vocab.merges))
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}  # fmt: skip
    for kind, token_id in vocab.special_ids.items():
        adders[kind](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)
