"""Lazy loading: decoder-block weights stay in their safetensors files until a block is needed.

``load_lazy(source)`` builds the model's skeleton with every parameter on the
meta device (buffers stay real, so RoPE tables are computed as usual), reads
the tensors outside the decoder blocks (embeddings, final norm, lm_head,
vision tower; tied weights re-tied) and records where each block parameter
lives: which ``.safetensors`` file (single file or shards named by
``model.safetensors.index.json``) under which key. ``LazyBlocks`` then

    materialize(i)  reads only block i's tensors (``safe_open(...).get_tensor``) onto a device
    release(i)      hands block i to the sink (e.g. a shard writer), then frees it

so a calibrated method walking the blocks holds one block at a time, and a
model larger than RAM can be compressed. Checkpoint key names are mapped to
module names with transformers' own renaming table (Gemma 3 saves
``language_model.model.*``); checkpoints that need a tensor conversion on load
are refused.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

from slimlm.errors import SlimlmError
from slimlm.models.adapters import decoder_blocks, get_adapter
from slimlm.models.builtin import builtin_dir
from slimlm.models.checks import check_causal, safetensors_files
from slimlm.models.source import load_tokenizer, read_config, resolve_source

log = logging.getLogger("slimlm.models")

ATTR = "_slimlm_lazy"  # where a lazily loaded model keeps its LazyBlocks
Sink = Callable[[int, nn.Module], None]  # (block index, block) -> None; writes the block somewhere


@dataclass(frozen=True)
class TensorSource:
    file: Path
    key: str  # the tensor's name inside ``file``
    dtype: torch.dtype  # the dtype the model holds it in


class SpilledBlock(nn.Module):
    """Stands in for a block that was written out and freed; running it is an error."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003 -- any block signature
        raise SlimlmError(f"decoder block {self.index} was written to the checkpoint and freed by lazy compression; "
                          "load the saved checkpoint (load_compressed) to run the model")  # fmt: skip


def _set_param(owner: nn.Module, name: str, t: torch.Tensor) -> nn.Parameter:
    p = nn.Parameter(t, requires_grad=False)
    owner._parameters[name] = p
    return p


class LazyBlocks:
    """Block i's parameters: on meta until ``materialize(i)``, freed again by ``release(i)``."""

    def __init__(self, blocks: nn.ModuleList, sources: list[dict[str, TensorSource]], device: torch.device) -> None:
        self.blocks = blocks
        self.sources = sources  # per block: block-relative parameter name -> where it is stored
        self.device = device  # where the non-block tensors are, the default compute device
        self.sink: Sink | None = None
        # per materialized block: (owner module, parameter name, parameter, its version when loaded)
        self._live: dict[int, list[tuple[nn.Module, str, nn.Parameter, int]]] = {}
        self.peak_live = 0  # most blocks materialized at once

    def __len__(self) -> int:
        return len(self.sources)

    def materialize(self, i: int, device: torch.device | str | None = None) -> nn.Module:
        """Read block ``i``'s parameters from disk onto ``device``; returns the block."""
        block = self.blocks[i]
        if i in self._live:
            return block
        if isinstance(block, SpilledBlock):
            raise SlimlmError(f"decoder block {i} was already written out and freed; lazy compression walks "
                              "the blocks once (one step per recipe)")  # fmt: skip
        device = torch.device(device) if device is not None else self.device
        by_file: dict[Path, list[tuple[str, TensorSource]]] = defaultdict(list)
        for rel, src in self.sources[i].items():
            by_file[src.file].append((rel, src))
        live = []
        for file, items in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:  # closed at once: no mapping outlives it
                for rel, src in items:
                    t = f.get_tensor(src.key).to(device=device, dtype=src.dtype)
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        raise SlimlmError(f"{src.key} in {file} holds NaN/Inf; fix or re-download the model")
                    owner_name, _, name = rel.rpartition(".")
                    owner = block.get_submodule(owner_name)
                    p = _set_param(owner, name, t)
                    live.append((owner, name, p, p._version))
        self._live[i] = live
        self.peak_live = max(self.peak_live, len(self._live))
        return block

    def changed(self, i: int) -> bool:
        """Whether block ``i`` was visibly rewritten: a module or parameter swapped, or an in-place write
        through the parameter (writes through ``.data`` are not seen)."""
        owners = {id(m) for m in self.blocks[i].modules()}
        return any(id(owner) not in owners or owner._parameters.get(name) is not p or p._version != version
                   for owner, name, p, version in self._live.get(i, []))  # fmt: skip

    def release(self, i: int) -> None:
        """Give block ``i`` to the sink (if any), then free it.

        With a sink the block is replaced by a :class:`SpilledBlock`; without
        one its parameters go back to meta (it can be read again), which is
        only right when nothing was rewritten.
        """
        if i not in self._live:
            return
        if self.sink is not None:
            self.sink(i, self.blocks[i])
            self.blocks[i] = SpilledBlock(i)
        elif self.changed(i):
            raise SlimlmError(f"decoder block {i} was rewritten but this lazily loaded model has no sink to write "
                              "it to; compress it with slimlm.pipelines.lazy.compress_lazy (or `slimlm compress "
                              "--lazy`)")  # fmt: skip
        # Also the parameters of modules the method swapped out (a handler may still hold them).
        for owner, name, p, _ in self._live.pop(i):
            owner._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                   requires_grad=False)  # fmt: skip


def lazy_blocks(model: nn.Module) -> LazyBlocks | None:
    """The LazyBlocks of a model made by :func:`load_lazy`, else None."""
    return getattr(model, ATTR, None)


# --- building the skeleton -------------------------------------------------------


def _checkpoint_keys(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or index + shards)."""
    files = safetensors_files(path)
    if not files:
        raise SlimlmError(f"lazy loading reads safetensors and {path} has none: re-save the model with "
                          "save_pretrained(dir) (safetensors is its default), or load it without lazy")  # fmt: skip
    where: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                where.update(dict.fromkeys(f.keys(), file))
        except (SafetensorError, OSError) as e:
            raise SlimlmError(f"{file} is corrupt or truncated ({e}): re-download or re-save the model") from None
    return where


def _key_map(model: nn.Module, ckpt_keys: list[str], wanted: dict[str, torch.Tensor]) -> dict[str, str]:
    """Model state-dict key -> checkpoint key, through transformers' renaming table."""
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    found: dict[str, str] = {}
    for key in ckpt_keys:
        new, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, wanted)
        if new not in wanted and key in wanted:
            new, pattern = key, None
        if pattern is not None:
            raise SlimlmError(f"checkpoint tensor {key} must be converted on load ({pattern}); lazy loading only "
                              "renames tensors: load this model without lazy")  # fmt: skip
        if new in wanted:
            found[new] = key
    return found


def _skeleton(config, dtype: torch.dtype) -> nn.Module:
    # Parameters on meta; buffers real, so non-persistent ones (RoPE inv_freq) are computed as usual.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _load_eager_part(model: nn.Module, keys: dict[str, str], where: dict[str, Path], wanted: dict, device) -> None:
    """Read the tensors named in ``keys`` (model key -> checkpoint key) into ``model`` on ``device``."""
    by_file: dict[Path, list[str]] = defaultdict(list)
    for model_key, ckpt_key in keys.items():
        by_file[where[ckpt_key]].append(model_key)
    for file, model_keys in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for model_key in model_keys:
                t = f.get_tensor(keys[model_key]).to(device=device, dtype=wanted[model_key].dtype)
                owner_name, _, name = model_key.rpartition(".")
                owner = model.get_submodule(owner_name)
                if name in owner._parameters:
                    _set_param(owner, name, t)
                else:
                    owner._buffers[name] = t


def load_lazy(source: str | os.PathLike = "smollm2-135m", *, dtype: torch.dtype = torch.float32,
              device: str = "cpu"):  # fmt: skip
    """A built-in or a local HF directory with its block weights left on disk. -> (model, tokenizer)."""
    resolved = resolve_source(source)
    if resolved.kind not in ("builtin", "hf_dir"):
        raise SlimlmError(f"lazy loading reads a built-in or a local Hugging Face directory of safetensors; "
                          f"{resolved.source} is a {resolved.kind} source: load it without lazy, or save it with "
                          "save_pretrained(dir) first")  # fmt: skip
    path = builtin_dir(resolved.source) if resolved.kind == "builtin" else resolved.path
    config = read_config(path)
    check_causal(config, where=str(path))
    where = _checkpoint_keys(path)
    model = _skeleton(config, dtype)
    prefix = get_adapter(model).blocks + "."
    wanted = model.state_dict()
    keys = _key_map(model, list(where), wanted)
    lazy_keys = {k for k, _ in model.named_parameters() if k.startswith(prefix)}
    missing = sorted(k for k in lazy_keys if k not in keys)
    if missing:
        raise SlimlmError(f"{path} has no tensor for {missing[0]} ({len(missing)} block tensor(s) missing): "
                          "re-save or re-download the model")  # fmt: skip
    device = torch.device(device)
    _load_eager_part(model, {k: v for k, v in keys.items() if k not in lazy_keys}, where, wanted, device)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta and n not in lazy_keys]
    if still_meta:
        raise SlimlmError(f"{path} has no tensor for {still_meta[0]}: re-save or re-download the model")
    blocks = decoder_blocks(model)
    sources: list[dict[str, TensorSource]] = [{} for _ in blocks]
    for key in sorted(lazy_keys):
        i, rel = key[len(prefix) :].split(".", 1)
        sources[int(i)][rel] = TensorSource(where[keys[key]], keys[key], wanted[key].dtype)
    setattr(model, ATTR, LazyBlocks(blocks, sources, device))
    log.info("loaded %s lazily: %d blocks left on disk", resolved.source, len(blocks))
    return model, load_tokenizer(path, str(path))
