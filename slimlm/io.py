"""Writing compressed checkpoints: packed tensors in safetensors plus a JSON manifest, and plain-HF export.

The layout and the reading side (``load_compressed``, ``read_manifest``)
are in :mod:`slimlm.models.checkpoint`; their names are importable from here
too, so ``slimlm.io`` is the one place users save and load checkpoints.
``save_compressed`` writes one file, ``ShardWriter`` one shard per decoder
block (lazy compression), ``export_hf`` a dequantized plain HF directory.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from safetensors.torch import save_model as st_save_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from slimlm import __version__
from slimlm.errors import SlimlmError
from slimlm.fsutil import atomic_dir
from slimlm.models.adapters import get_adapter
from slimlm.models.checkpoint import (FORMAT, INDEX, MANIFEST, WEIGHTS, compressed_modules, is_compressed_dir,
                                      load_compressed, read_manifest)  # fmt: skip
from slimlm.models.integrity import MANIFEST_SHA256, SHA256, file_sha256, manifest_sha256
from slimlm.nn.quant_embedding import float_embeddings
from slimlm.nn.runtime import replace_module

__all__ = ["FORMAT", "INDEX", "MANIFEST", "WEIGHTS", "ShardWriter", "compressed_modules", "dequantized_copy",
           "export_hf", "is_compressed_dir", "load_compressed", "read_manifest", "save_compressed"]

log = logging.getLogger("slimlm.io")


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
    _refuse_adapters(model)
    modules = {name: m.manifest_entry() for name, m in compressed_modules(model).items()}
    manifest = _manifest(model, modules, base_model, recipe, calibration)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        seal = manifest_sha256(manifest)  # the manifest's digest, kept with the tensors
        st_save_model(model, str(tmp / WEIGHTS), metadata={"format": FORMAT, MANIFEST_SHA256: seal})
        manifest[SHA256] = {WEIGHTS: file_sha256(tmp / WEIGHTS)}
        _write_rest(tmp, model, tokenizer, manifest)
    log.info("saved compressed model to %s", out_dir)
    return Path(out_dir)


def _refuse_adapters(model: nn.Module) -> None:
    """A model carrying PEFT adapters beside its base (``.base_layer`` wrappers, a soft prompt) has no
    checkpoint form: it would save, then fail to load."""
    wrapped = next((n for n, _ in model.named_modules() if n.endswith(".base_layer")), None)
    if wrapped is not None or hasattr(model, "soft_prompt"):
        where = wrapped.removesuffix(".base_layer") if wrapped else "a soft prompt"
        raise SlimlmError(f"the model carries a PEFT adapter ({where}): save it with slimlm.peft.save_adapter and "
                          f"the base without it, or merge it (merge: true) before save_compressed")  # fmt: skip


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
        self.digests: dict[str, str] = {}  # shard -> sha256, recorded in the manifest
        self.total_size = 0

    def shard_name(self, k: int) -> str:
        return f"model-{k + 1:05d}-of-{self.n_blocks + 1:05d}.safetensors"

    def _write(self, k: int, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        tensors = _unique_tensors(state)
        save_file(tensors, str(self.folder / self.shard_name(k)), metadata={"format": FORMAT, **(metadata or {})})
        self.digests[self.shard_name(k)] = file_sha256(self.folder / self.shard_name(k))
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
        modules = {**self.modules, **{n: m.manifest_entry() for n, m in compressed_modules(model).items()}}
        manifest = _manifest(model, modules, base_model, recipe, calibration)
        # the blocks left are SpilledBlocks (no tensors); the last shard seals the manifest
        self._write(self.n_blocks, model.state_dict(), {MANIFEST_SHA256: manifest_sha256(manifest)})
        index = {"metadata": {"total_size": self.total_size, "format": FORMAT}, "weight_map": self.weight_map}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        _write_rest(self.folder, model, tokenizer, {**manifest, SHA256: dict(self.digests)})


def dequantized_copy(model: nn.Module) -> nn.Module:
    """Replace every compressed module by a plain float linear of its dequantized weight (in place)."""
    float_embeddings(model)  # an embedding reading the quantized head's table: that table, dequantized
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


def retie(model: nn.Module) -> None:
    """Tie the (float) output projection to the input embedding again, as the config says (the inverse of
    :func:`slimlm.nn.tied.untie_head`); their tables must be equal."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not torch.equal(emb.weight, head.weight):
        raise SlimlmError("the embedding and lm_head tables differ; they cannot be tied (a slimlm bug)")
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = True
    head.weight = emb.weight
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        head_name = next(n for n, m in model.named_modules() if m is head)
        emb_name = next(n for n, m in model.named_modules() if m is emb)
        tied[f"{head_name}.weight"] = f"{emb_name}.weight"


def export_hf(path: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a dequantized plain HF directory that stock transformers loads."""
    model, tokenizer = load_compressed(path)
    factorized = [n for n, m in compressed_modules(model).items() if isinstance(getattr(m, "rank", None), int)]
    if factorized:  # a stock HF linear holds one matrix: the factors go out multiplied
        log.warning("export hf: %d low-rank linears written dense (B @ A), so the factorization's size and speed "
                    "saving is lost in this export (first: %s); keep the slimlm checkpoint to keep it",
                    len(factorized), factorized[0])  # fmt: skip
    shared = [n for n, m in compressed_modules(model).items() if isinstance(getattr(m, "reads", None), str)]
    dequantized_copy(model)
    if shared:  # the embedding and the head were one quantized table: one float table again, tied
        retie(model)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
