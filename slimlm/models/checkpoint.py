"""Reading slimlm checkpoints: the manifest, and ``load_compressed`` (writing is in :mod:`slimlm.io`).

A checkpoint directory holds

    config.json, generation_config.json, tokenizer files   (as HF writes them)
    model.safetensors       every tensor of the model; compressed linears as their packed buffers
      or, written block by block by lazy compression (``slimlm.io.ShardWriter``):
    model-00001-of-000NN.safetensors ...   one shard per decoder block, the last holds the rest
    model.safetensors.index.json           the HF index: {"metadata": {...}, "weight_map": {tensor: shard}}
    slimlm_manifest.json    format version, slimlm version, base model, recipe, and per compressed
                            module its manifest entry (runtime type, sizes, scheme: slimlm.nn.runtime)

``load_compressed`` rebuilds the model from its config, swaps in empty
runtime modules named by the manifest and loads the tensors: outputs are
bit-identical to the model that was saved. Only safetensors are read, so
loading never executes code from the checkpoint. It lives with the model
loaders because ``load_model`` reads a checkpoint like any other source.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import load_model as st_load_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from slimlm.errors import SlimlmError
from slimlm.nn import RUNTIME_MODULES, RuntimeModule
from slimlm.nn.runtime import replace_module

MANIFEST = "slimlm_manifest.json"
FORMAT = "slimlm.checkpoint/1"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"  # a sharded checkpoint's weight map (HF convention)


def is_compressed_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _shell(entry: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """An empty runtime module that load_state_dict fills."""
    cls = RUNTIME_MODULES.get(entry.get("type"))
    if cls is None:
        raise SlimlmError(f"checkpoint uses module type {entry.get('type')!r} that this slimlm does not know; "
                          f"known: {', '.join(RUNTIME_MODULES)} (upgrade slimlm?)")  # fmt: skip
    return cls.from_manifest(entry, dtype=dtype)


def compressed_modules(model: nn.Module) -> dict[str, RuntimeModule]:
    return {name: m for name, m in model.named_modules() if isinstance(m, RuntimeModule)}


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise SlimlmError(f"checkpoint {path} does not exist: give a directory written by `slimlm compress`")
    if not (path / MANIFEST).is_file():
        raise SlimlmError(f"{path} is not a slimlm checkpoint (no {MANIFEST}): give a directory written by "
                          "`slimlm compress`")  # fmt: skip
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SlimlmError(f"{path / MANIFEST} is unreadable ({e}); the checkpoint is damaged: compress again") from None
    if manifest.get("format") != FORMAT:
        raise SlimlmError(f"{path} holds checkpoint format {manifest.get('format')!r}; this slimlm reads {FORMAT}")
    return manifest


def load_compressed(path: str | os.PathLike, *, device: str = "cpu") -> tuple[nn.Module, Any]:
    """Rebuild a model saved by ``save_compressed``. -> (model, tokenizer)."""
    path = Path(path)
    manifest = read_manifest(path)
    weights = path / WEIGHTS
    sharded = not weights.is_file() and (path / INDEX).is_file()
    if not weights.is_file() and not sharded:
        pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
        hint = f" (found {', '.join(pickles)}: slimlm never loads pickle files)" if pickles else ""
        raise SlimlmError(f"{path} has no {WEIGHTS}{hint}; the checkpoint is incomplete: compress again")
    dtype = getattr(torch, manifest.get("dtype", "float32"))
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, entry in manifest["modules"].items():
        replace_module(model, name, _shell(entry, dtype))
    if sharded:
        weights = path / INDEX
        missing, unexpected = _load_shards(model, path)
    else:
        try:
            missing, unexpected = st_load_model(model, str(weights), strict=False)
        except (SafetensorError, OSError) as e:
            raise SlimlmError(f"{weights} is corrupt or truncated ({e}); compress again") from None
    if missing or unexpected:
        raise SlimlmError(f"{weights} does not match its manifest (missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}): compress again")  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tokenizer


def _tied_names(model: nn.Module) -> list[set[str]]:
    """Groups of state-dict names that are one parameter (tied embeddings)."""
    by_id: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), set()).add(name)
    return [names for names in by_id.values() if len(names) > 1]


def _load_shards(model: nn.Module, path: Path) -> tuple[list[str], list[str]]:
    """Load an index + shards one shard at a time. -> (missing, unexpected) names."""
    try:
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        shards = sorted({str(v) for v in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SlimlmError(f"{path / INDEX} is unreadable ({e}); the checkpoint is damaged: compress again") from None
    expected, loaded, unexpected = set(model.state_dict()), set(), []
    for shard in shards:
        try:
            state = load_file(str(path / shard))
        except (SafetensorError, OSError) as e:
            raise SlimlmError(f"{path / shard} is missing, corrupt or truncated ({e}); compress again") from None
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape or dtype mismatches
            raise SlimlmError(f"{path / shard} does not match its manifest ({str(e).splitlines()[-1].strip()}): "
                              "compress again") from None  # fmt: skip
        unexpected += result.unexpected_keys
        loaded |= state.keys()
    for names in _tied_names(model):  # stored once, under any of its names
        if names & loaded:
            loaded |= names
    return sorted(expected - loaded), unexpected
