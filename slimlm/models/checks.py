"""Checks run before handing a local model to transformers, so failures read as one line."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from slimlm.errors import SlimlmError
from slimlm.models._common import short_error

# Architecture class names that carry a next-token head.
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def check_causal(config, *, where: str) -> None:
    """Refuse configs that do not describe a decoder-only causal LM."""
    model_type = getattr(config, "model_type", None)
    archs = [a for a in (getattr(config, "architectures", None) or []) if isinstance(a, str)]
    reason = None
    if getattr(config, "is_encoder_decoder", False):
        reason = "it is an encoder-decoder model"
    elif model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        reason = "transformers has no causal-LM class for it"
    elif model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        # bert, roberta, ...: encoders that only act as decoders when configured so.
        reason = "it is a bidirectional encoder"
    elif archs and not any(a.endswith(_CAUSAL_SUFFIXES) for a in archs):
        reason = f"its architectures are {', '.join(archs)}"
    if reason is not None:
        raise SlimlmError(
            f"{where} is a `{model_type}` model with no causal-LM head ({reason}); slimlm needs a causal "
            "(decoder-only) language model, e.g. Llama, Qwen2, Mistral, Gemma, OPT or GPT-2"
        )


def safetensors_files(path: Path) -> list[Path]:
    """Files the checkpoint uses: the index's shards if there is an index, else *.safetensors."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return sorted(path.glob("*.safetensors"))
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted({str(v) for v in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SlimlmError(f"{index} is corrupt ({short_error(e)}): re-save or re-download the model") from e
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
        raise SlimlmError(
            f"{path} is missing weight shards listed in {index.name}: {', '.join(missing[:5])}; "
            "re-download or re-save the model"
        )
    return [path / s for s in shards]


def check_weight_files(path: Path) -> None:
    """Read every safetensors header; refuse a directory without weights."""
    files = safetensors_files(path)
    if not files and not list(path.glob("pytorch_model*.bin")):
        raise SlimlmError(
            f"{path} has a config.json but no weights (model.safetensors or pytorch_model.bin): "
            "save the model with model.save_pretrained(dir)"
        )
    for file in files:
        try:
            # Opening parses the header and checks the data region covers every
            # tensor, which catches truncated downloads without reading weights.
            with safe_open(file, framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise SlimlmError(
                f"{file} is corrupt or truncated ({short_error(e)}): re-download or re-save the model"
            ) from e
