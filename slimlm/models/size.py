"""Size of a model in bytes and bits per weight, read from the real buffers (the protocol's size
measurement, :mod:`slimlm.eval`, and ``slimlm info`` both read it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slimlm.models.adapters import block_linears, decoder_blocks, get_adapter


@dataclass(frozen=True)
class SizeReport:
    params: int  # parameters (a compressed linear counts its logical weights), shared tensors once
    model_bytes: int  # bytes of parameters, buffers and packed weights, shared counted once
    linear_weights: int  # weights in the decoder blocks' linears
    linear_bytes: int  # bytes those weights take, with scales, zeros, masks and codebooks
    bits_per_weight: float  # 8 * linear_bytes / linear_weights
    checkpoint_bytes: int | None  # bytes of the safetensors files on disk, when loaded from disk


def _unique(tensors) -> list[torch.Tensor]:
    """Each underlying tensor once (tied weights share one storage)."""
    seen, out = set(), []
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def unique_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers, shared ones once."""
    return _unique(list(module.parameters()) + list(module.buffers()))


def unique_params(module: nn.Module) -> list[torch.Tensor]:
    return _unique(module.parameters())


def weight_storage(module: nn.Module) -> tuple[int, int]:
    """(number of weights, bytes that store them) for a linear-like module.

    Compressed modules report their own storage through ``weight_storage()``
    so that packed codes, scales, zeros, masks and codebooks are all counted.
    A module without one stores its weights as parameters: ``weight``, or, in
    a factorized linear (``LowRankLinear``), every parameter but the bias, so
    its weights are the ``rank * (in + out)`` it really holds.
    """
    if hasattr(module, "weight_storage"):
        return module.weight_storage()
    ws = [module.weight] if hasattr(module, "weight") else [p for n, p in module.named_parameters() if n != "bias"]
    return sum(w.numel() for w in ws), sum(w.numel() * w.element_size() for w in ws)


def block_linears_of(model: nn.Module) -> list[nn.Module]:
    adapter = get_adapter(model)
    return [m for block in decoder_blocks(model) for m in block_linears(block, adapter).values()]


def packed_storage(model: nn.Module) -> tuple[int, int]:
    """(weights, bytes) held by compressed runtime modules outside parameters and buffers.

    Runtime modules (QuantLinear, ...) keep their packed tensors as plain
    attributes (so a dtype cast cannot round their scales); they report them
    through ``weight_storage()``. A module holding another that reports (a
    CompensatedLinear: quantized base + float side path) reports its whole
    layer for bits per weight; here only the innermost count, its float
    factors being parameters already.
    """
    n_w = n_b = 0
    for m in model.modules():
        if hasattr(m, "weight_storage") and not _holds_storage(m):
            w, b = m.weight_storage()
            n_w, n_b = n_w + w, n_b + b
    return n_w, n_b


def _holds_storage(module: nn.Module) -> bool:
    return any(hasattr(m, "weight_storage") for m in module.modules() if m is not module)


def measure_size_light(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of any module tree: shared tensors once, packed weights included."""
    packed_w, packed_b = packed_storage(model)
    params = sum(p.numel() for p in unique_params(model)) + packed_w
    return params, sum(t.numel() * t.element_size() for t in unique_tensors(model)) + packed_b


def measure_size(model: nn.Module, *, model_dir: str | Path | None = None) -> SizeReport:
    params, model_bytes = measure_size_light(model)
    n_w = n_b = 0
    for m in block_linears_of(model):
        w, b = weight_storage(m)
        n_w, n_b = n_w + w, n_b + b
    ckpt = None
    if model_dir is not None and Path(model_dir).is_dir():
        ckpt = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors")) or None
    return SizeReport(
        params=params,
        model_bytes=model_bytes,
        linear_weights=n_w,
        linear_bytes=n_b,
        bits_per_weight=8.0 * n_b / n_w if n_w else float("nan"),
        checkpoint_bytes=ckpt,
    )


def bytes_read_per_token(model: nn.Module) -> int:
    """Weight bytes one decode step reads: every parameter once and every packed weight (a quantized
    lm_head's codes and scales), except that an input embedding table the head does not share is only
    indexed (one row), not read whole."""
    total = sum(t.numel() * t.element_size() for t in unique_params(model)) + packed_storage(model)[1]
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # an embedding reading the quantized head's table (SharedQuantEmbedding) has no weight parameter: the
    # head's packed table is counted once above
    w = None if emb is None else dict(emb.named_parameters(recurse=False)).get("weight")
    if w is not None and not _shares(head, w):
        total -= w.numel() * w.element_size() - w.shape[-1] * w.element_size()
    return total


def _shares(head: nn.Module | None, weight: torch.Tensor) -> bool:
    """Whether ``head`` (a linear, a quantized linear, None) holds ``weight``'s storage among its parameters."""
    return head is not None and any(p.data_ptr() == weight.data_ptr() for p in head.parameters())
