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
from slimlm.models.integrity import verify_files, verify_manifest
from slimlm.nn import RUNTIME_MODULES, RuntimeModule
from slimlm.nn.runtime import replace_module

MANIFEST = "slimlm_manifest.json"
FORMAT = "slimlm.checkpoint/1"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"  # a sharded checkpoint's weight map (HF convention)
DTYPES = ("float32", "bfloat16", "float16")
DAMAGED = "the checkpoint is damaged: compress again"


def is_compressed_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _shell(model: nn.Module, name: str, entry: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """An empty runtime module that load_state_dict fills, for the linear at ``name`` of ``model``."""
    cls = RUNTIME_MODULES.get(entry.get("type"))
    if cls is None:
        raise SlimlmError(f"checkpoint uses module type {entry.get('type')!r} that this slimlm does not know (at "
                          f"{name}); known: {', '.join(RUNTIME_MODULES)} (upgrade slimlm?)")  # fmt: skip
    try:
        model.get_submodule(name)
    except AttributeError:
        raise SlimlmError(f"the manifest names module {name!r}, which this model does not have; {DAMAGED}") from None
    try:
        return cls.from_manifest(entry, dtype=dtype, table=RUNTIME_MODULES)
    except SlimlmError as e:
        raise SlimlmError(f"the manifest entry of {name} is unusable ({e}); {DAMAGED}") from None


def compressed_modules(model: nn.Module) -> dict[str, RuntimeModule]:
    """Full name -> runtime module, outermost only: a runtime module inside another (the quantized base
    of a ``CompensatedLinear``) is stored, described and exported by the one that holds it."""
    found: dict[str, RuntimeModule] = {}
    for name, m in model.named_modules():  # parents come before their children
        if isinstance(m, RuntimeModule) and not any(name.startswith(p + ".") for p in found):
            found[name] = m
    return found


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
    if not isinstance(manifest, dict):
        raise SlimlmError(f"{path / MANIFEST} is not a JSON object; {DAMAGED}")
    if manifest.get("format") != FORMAT:
        raise SlimlmError(f"{path} holds checkpoint format {manifest.get('format')!r}; this slimlm reads {FORMAT}")
    modules = manifest.get("modules")
    if not isinstance(modules, dict) or not all(isinstance(e, dict) for e in modules.values()):
        raise SlimlmError(f"{path / MANIFEST} has no 'modules' mapping of module names to entries; {DAMAGED}")
    if manifest.get("dtype", "float32") not in DTYPES:
        raise SlimlmError(f"{path / MANIFEST} records dtype {manifest.get('dtype')!r}; valid: {', '.join(DTYPES)}; "
                          f"{DAMAGED}")  # fmt: skip
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
    shards = _shard_names(path) if sharded else [WEIGHTS]
    verify_files(path, manifest)
    verify_manifest(path / shards[-1], manifest)  # the last file written carries the manifest's digest
    dtype = getattr(torch, manifest.get("dtype", "float32"))
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, entry in manifest["modules"].items():
        replace_module(model, name, _shell(model, name, entry, dtype))
    for m in compressed_modules(model).values():  # modules that read others (a shared embedding: its head)
        m.link(model)
    if sharded:
        weights = path / INDEX
        missing, unexpected = _load_shards(model, path, shards)
    else:
        try:
            missing, unexpected = st_load_model(model, str(weights), strict=False)
        except (SafetensorError, OSError) as e:
            raise SlimlmError(f"{weights} is corrupt or truncated ({e}); compress again") from None
        except RuntimeError as e:  # shape or dtype mismatches
            raise _mismatch(weights, e) from None
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


def _mismatch(file: Path, e: RuntimeError) -> SlimlmError:
    """torch's multi-line load_state_dict error as one line: its last line names the tensor."""
    last = str(e).strip().splitlines()[-1].strip()
    return SlimlmError(f"{file} does not match its manifest ({last}): compress again")


def _shard_names(path: Path) -> list[str]:
    """The shard files a sharded checkpoint's index names, in order (the last holds the non-block tensors)."""
    try:
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        shards = sorted({str(v) for v in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SlimlmError(f"{path / INDEX} is unreadable ({e}); {DAMAGED}") from None
    if not shards or any(Path(s).name != s for s in shards):
        raise SlimlmError(f"{path / INDEX} names no shard files of this folder; {DAMAGED}")
    return shards


def _load_shards(model: nn.Module, path: Path, shards: list[str]) -> tuple[list[str], list[str]]:
    """Load the shards one at a time. -> (missing, unexpected) names."""
    expected, loaded, unexpected = set(model.state_dict()), set(), []
    for shard in shards:
        try:
            state = load_file(str(path / shard))
        except (SafetensorError, OSError) as e:
            raise SlimlmError(f"{path / shard} is missing, corrupt or truncated ({e}); compress again") from None
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape or dtype mismatches
            raise _mismatch(path / shard, e) from None
        unexpected += result.unexpected_keys
        loaded |= state.keys()
    for names in _tied_names(model):  # stored once, under any of its names
        if names & loaded:
            loaded |= names
    return sorted(expected - loaded), unexpected
