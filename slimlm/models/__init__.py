"""Models: loading (built-ins, HF dirs, hub ids, GGUF), family adapters, tiny test models, info."""

from slimlm.models.adapters import (
    ADAPTERS,
    Adapter,
    HeadLayout,
    LinearGroup,
    block_linears,
    decoder_blocks,
    get_adapter,
    head_layout,
    kv_bytes_per_token,
)
from slimlm.models.builtin import BUILTINS, BuiltinSpec, builtin_dir
from slimlm.models.info import ModelInfo, format_info, model_info
from slimlm.models.lazy import LazyBlocks, lazy_blocks, load_lazy
from slimlm.models.loading import load_model
from slimlm.models.source import ModelSource, resolve_source
from slimlm.models.tiny import TINY_FAMILIES, save_tiny_model_dir, tiny_model, tiny_tokenizer

__all__ = [
    "ADAPTERS",
    "Adapter",
    "BUILTINS",
    "BuiltinSpec",
    "HeadLayout",
    "LazyBlocks",
    "LinearGroup",
    "ModelInfo",
    "ModelSource",
    "TINY_FAMILIES",
    "block_linears",
    "builtin_dir",
    "decoder_blocks",
    "format_info",
    "get_adapter",
    "head_layout",
    "kv_bytes_per_token",
    "lazy_blocks",
    "load_lazy",
    "load_model",
    "model_info",
    "resolve_source",
    "save_tiny_model_dir",
    "tiny_model",
    "tiny_tokenizer",
]
