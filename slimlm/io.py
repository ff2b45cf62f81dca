"""Compressed checkpoints: packed tensors in safetensors plus a JSON manifest.

A checkpoint directory holds

    config.json, generation_config.json, tokenizer files   (as HF writes them)
    model.safetensors       every tensor of the model; compressed linears as their packed buffers
      or, written block by block by lazy compression (``ShardWriter``):
    model-00001-of-000NN.safetensors ...   one shard per decoder block, the last holds the rest
    model.safetensors.index.json           the HF index: {"metadata": {...}, "weight_map": {tensor: shard}}
    slimlm_manifest.json    format version, slimlm version, base model, recipe, and per compressed
                            module its runtime type, scheme and shape

``load_compressed`` rebuilds the model from its config, swaps in empty
runtime modules named by the manifest and loads the tensors: outputs are
bit-identical to the model that was saved. Only safetensors are read, so
loading never executes code from the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from slimlm import __version__
from slimlm.errors import SlimlmError
from slimlm.fsutil import atomic_dir
from slimlm.models.adapters import get_adapter
from slimlm.nn import RUNTIME_MODULES, RuntimeModule
from slimlm.targets import replace_module

log = logging.getLogger("slimlm.io")

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


def save_compressed(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    base_model: str | None = None,
    recipe: Any = None,
    calibration: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (compressed in place by slimlm) to ``out_dir`` atomically."""
    modules = {name: m.manifest_entry() for name, m in compressed_modules(model).items()}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        st_save_model(model, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        _write_rest(tmp, model, tokenizer, _manifest(model, modules, base_model, recipe, calibration))
    log.info("saved compressed model to %s", out_dir)
    return Path(out_dir)


def _manifest(model: nn.Module, modules: dict[str, Any], base_model: str | None, recipe: Any,
              calibration: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    return {
        "format": FORMAT,
        "slimlm_version": __version__,
        "base_model": base_model,
        "recipe": recipe,
        "calibration": calibration,
        "dtype": str(model.dtype).removeprefix("torch."),
        "modules": modules,
    }


def _write_rest(tmp: Path, model: nn.Module, tokenizer: Any, manifest: dict[str, Any]) -> None:
    """Config, generation config, tokenizer and the manifest (written last)."""
    model.config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of a tensor stored under several (tied embeddings); contiguous, on CPU, for safetensors."""
    kept, seen = {}, set()
    for name, t in state.items():
        ident = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        kept[name] = t.detach().to("cpu").contiguous()
    return kept


class ShardWriter:
    """Write a sharded checkpoint into ``folder`` (an ``atomic_dir``) as decoder blocks finish.

    ``write_block(i, block)`` is a lazy model's sink (see
    :class:`slimlm.models.lazy.LazyBlocks`): shard ``i+1`` holds block ``i``.
    ``finish(model, ...)`` writes the remaining tensors (embeddings, final norm,
    lm_head) as the last shard, the index, config, tokenizer and manifest.
    """

    def __init__(self, folder: Path, *, blocks_prefix: str, n_blocks: int) -> None:
        self.folder, self.prefix, self.n_blocks = Path(folder), blocks_prefix, n_blocks
        self.weight_map: dict[str, str] = {}
        self.modules: dict[str, dict[str, Any]] = {}
        self.written: set[int] = set()
        self.total_size = 0

    def shard_name(self, k: int) -> str:
        return f"model-{k + 1:05d}-of-{self.n_blocks + 1:05d}.safetensors"

    def _write(self, k: int, state: dict[str, torch.Tensor]) -> None:
        tensors = _unique_tensors(state)
        save_file(tensors, str(self.folder / self.shard_name(k)), metadata={"format": FORMAT})
        self.weight_map.update(dict.fromkeys(tensors, self.shard_name(k)))
        self.total_size += sum(t.numel() * t.element_size() for t in tensors.values())

    def write_block(self, i: int, block: nn.Module) -> None:
        prefix = f"{self.prefix}.{i}"
        self._write(i, {f"{prefix}.{k}": v for k, v in block.state_dict().items()})
        self.modules.update({f"{prefix}.{n}": m.manifest_entry() for n, m in compressed_modules(block).items()})
        self.written.add(i)

    def finish(self, model: nn.Module, tokenizer: Any, *, base_model: str | None = None, recipe: Any = None,
               calibration: dict[str, Any] | None = None) -> None:  # fmt: skip
        missing = sorted(set(range(self.n_blocks)) - self.written)
        if missing:
            raise SlimlmError(f"decoder blocks {missing[:5]} were never written; the checkpoint is incomplete")
        self._write(self.n_blocks, model.state_dict())  # the blocks left are SpilledBlocks: no tensors
        index = {"metadata": {"total_size": self.total_size, "format": FORMAT}, "weight_map": self.weight_map}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        modules = {**self.modules, **{n: m.manifest_entry() for n, m in compressed_modules(model).items()}}
        _write_rest(self.folder, model, tokenizer, _manifest(model, modules, base_model, recipe, calibration))


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


def dequantized_copy(model: nn.Module) -> nn.Module:
    """Replace every compressed module by a plain float linear of its dequantized weight (in place)."""
    conv1d = get_adapter(model).linear_kind == "conv1d"
    for name, m in compressed_modules(model).items():
        W = m.dequantized_weight().to(model.dtype)  # (out, in)
        if conv1d and not name.endswith(get_adapter(model).lm_head):
            lin = Conv1D(m.out_features, m.in_features)
            lin.weight.data = W.t().contiguous()  # Conv1D keeps (in, out)
        else:
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=model.dtype)
            lin.weight.data = W
        if m.bias is not None:
            lin.bias.data = m.bias.detach().to(model.dtype).clone()
        replace_module(model, name, lin)
    return model


def export_hf(path: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a dequantized plain HF directory that stock transformers loads."""
    model, tokenizer = load_compressed(path)
    dequantized_copy(model)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
