"""Shared by the compressed-tensors export tests: export a tiny model, load it back in stock transformers."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from slimlm.export.compressed_tensors import export_compressed_tensors
from slimlm.io import dequantized_copy, save_compressed
from slimlm.models.tiny import tiny_tokenizer

IDS = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(3, 512, (4, 48), generator=torch.Generator().manual_seed(0))


def export(tmp_path: Path, model: torch.nn.Module) -> tuple[Path, Path]:
    """Save ``model`` as a slimlm checkpoint and export it. -> (checkpoint, export dir)."""
    ck = save_compressed(model, tiny_tokenizer(), tmp_path / "ckpt")
    return ck, export_compressed_tensors(ck, tmp_path / "ct")


def load_hf(out: Path, *, dequantize: bool) -> torch.nn.Module:
    """Stock transformers' load: ``dequantize=True`` decompresses at load time; False is the default path
    (compressed modules, decompressed by a hook on the first forward)."""
    if dequantize:
        return AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    return AutoModelForCausalLM.from_pretrained(out)


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    return model(ids).logits


@torch.no_grad()
def dequantized_logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    """slimlm's own float model of the same weights (every compressed linear dequantized)."""
    return dequantized_copy(copy.deepcopy(model))(ids).logits


def ct_config(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())["quantization_config"]


def ct_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))
