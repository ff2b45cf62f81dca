"""Tiny random models of every supported family, built from configs (no downloads).

Tests of every slimlm module run on these: 2 decoder layers, hidden size 64,
4 query heads sharing 2 KV heads where the family has GQA, float32, eval mode,
weights a pure function of the seed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from slimlm.errors import SlimlmError

log = logging.getLogger("slimlm.models")

# Special token ids shared by tiny_tokenizer and every tiny config.
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# An explicit unk token stops tokenizer classes that transformers substitutes
# for some model types (Qwen2Tokenizer for qwen2) from appending their own
# default unk beyond the model's vocabulary.
_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")

_DECODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

# family -> (config class name in transformers, config kwargs beyond vocab/special ids)
_FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(_DECODER, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(_DECODER, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(_DECODER)),
    "qwen3": ("Qwen3Config", dict(_DECODER, head_dim=16)),
    "gemma": ("GemmaConfig", dict(_DECODER, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(_DECODER, head_dim=16, sliding_window=32)),
    "gemma3_text": ("Gemma3TextConfig", dict(_DECODER, head_dim=16, sliding_window=32)),
    "phi3": ("Phi3Config", dict(_DECODER, tie_word_embeddings=False)),
    "opt": (
        "OPTConfig",
        dict(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=256,
        ),
    ),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=256)),
}

TINY_FAMILIES: tuple[str, ...] = tuple(_FAMILIES) + ("gemma3",)


def tiny_config(family: str, *, vocab_size: int = 512):
    """The transformers config of ``tiny_model(family)``."""
    ids = dict(vocab_size=vocab_size, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    if family == "gemma3":
        return _tiny_gemma3_config(ids)
    if family not in _FAMILIES:
        raise SlimlmError(f"unknown tiny family {family!r}; choose one of: {', '.join(TINY_FAMILIES)}")
    cls_name, kwargs = _FAMILIES[family]
    return getattr(transformers, cls_name)(**kwargs, **ids)


def _tiny_gemma3_config(ids: dict):
    """Gemma 3 multimodal: the tiny text model plus a 1-layer SigLIP on 28x28 images."""
    cls_name, kwargs = _FAMILIES["gemma3_text"]
    text = getattr(transformers, cls_name)(**kwargs, **ids)
    vision = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    # 2x2 patches pooled to mm_tokens_per_image=4 soft tokens per image.
    return transformers.Gemma3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        image_token_index=ids["vocab_size"] - 1,
        boi_token_index=ids["vocab_size"] - 2,
        eoi_token_index=ids["vocab_size"] - 3,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def tiny_model(family: str, *, seed: int = 0, vocab_size: int = 512) -> PreTrainedModel:
    """A 2-layer random model of ``family`` (see TINY_FAMILIES), float32, eval mode."""
    config = tiny_config(family, vocab_size=vocab_size)
    # Initialise under a forked RNG so the weights depend on the seed only and
    # the caller's global RNG state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


_TRAIN_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model reads a short text and
predicts the next token. Compression makes large language models smaller, faster
and cheaper: quantization stores weights in fewer bits, pruning removes weights,
low-rank factorization splits a matrix into two thin ones, and distillation teaches
a student to imitate its teacher. We measure perplexity, divergence, size and speed.
The capital of France is Paris. The capital of Germany is Berlin. One, two, three,
four, five, six, seven, eight, nine, ten. 0123456789 (){}[]<>+-*/=_,.;:!?'"\n
"""


def tiny_tokenizer(vocab_size: int = 512, *, add_bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process on a built-in paragraph.

    Ids 0-3 are <pad>, <s>, </s>, <unk>; the 256 byte symbols follow, so every
    string round-trips; merges fill the rest up to ``vocab_size``. With
    ``add_bos`` every input starts with <s>, as Llama's, Mistral's and Gemma's
    tokenizers do (SmolLM2's, like the default here, adds nothing).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    min_vocab = len(_SPECIALS) + 256
    if vocab_size < min_vocab:
        raise SlimlmError(f"tiny_tokenizer vocab_size {vocab_size} is too small; use at least {min_vocab}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAIN_TEXT.splitlines(), trainer=trainer)
    if add_bos:
        bos = _SPECIALS[BOS_ID]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, BOS_ID)])  # fmt: skip
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=_SPECIALS[PAD_ID],
        bos_token=_SPECIALS[BOS_ID],
        eos_token=_SPECIALS[EOS_ID],
        unk_token=_SPECIALS[UNK_ID],
        model_max_length=256,
    )


def save_tiny_model_dir(path: str | os.PathLike, family: str = "llama", *, seed: int = 0,
                        add_bos: bool = False) -> Path:
    """Write a complete HF directory (safetensors model + tokenizer) for ``load_model``."""
    path = Path(path)
    model = tiny_model(family, seed=seed)
    tokenizer = tiny_tokenizer(model.config.get_text_config().vocab_size, add_bos=add_bos)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    log.debug("wrote tiny %s model to %s", family, path)
    return path
