"""model_info: what a model is made of (parameters, bytes, layers, heads, KV cache, linears)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from slimlm.formats import scheme_to_dict
from slimlm.kernels import KernelReport, kernel_report
from slimlm.models.adapters import ADAPTERS, HeadLayout, head_layout, num_layers
from slimlm.models.size import measure_size_light


class LinearInfo(NamedTuple):
    name: str
    in_features: int
    out_features: int
    dtype: str  # e.g. "float32"; the weight's storage dtype for swapped-in modules


@dataclass(frozen=True)
class ModelInfo:
    architecture: str  # class name, e.g. LlamaForCausalLM
    model_type: str
    n_params: int  # shared (tied) parameters counted once
    dtype: str  # e.g. "float32"
    size_bytes: int  # parameters + buffers, shared tensors counted once
    n_layers: int
    heads: HeadLayout
    kv_bytes_per_token: int  # K and V for one token at the model dtype
    tied_embeddings: bool
    linears: tuple[LinearInfo, ...]  # every Linear / Conv1D / linear-like module, lm_head included
    kernels: KernelReport | None = None  # which kernel the runtime linears run; None when there are none
    shared_table: str | None = None  # "model.embed_tokens reads lm_head" when the lookup reads the quantized head


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def scheme_label(scheme) -> str:
    """Short name of a scheme in the YAML shorthand where one exists ("int4-g64", "nf4 ...")."""
    d = scheme_to_dict(scheme)
    fmt = d.pop("format")
    if fmt == "int":
        gs = d["group_size"]
        return (f"int{d['bits']}-" + (f"g{gs}" if isinstance(gs, int) else gs)
                + ("-sym" if d["symmetric"] else "") + ("-clip" if d.get("clip_search") else ""))  # fmt: skip
    return fmt + "".join(f" {k}={v}" for k, v in d.items())


def _linear_info(name: str, module: nn.Module) -> LinearInfo | None:
    if isinstance(getattr(module, "reads", None), str):  # a lookup into another module's table: not a linear
        return None
    weight = getattr(module, "weight", None)
    dtype = _dtype_name(weight.dtype) if isinstance(weight, torch.Tensor) else "unknown"
    if getattr(module, "scheme", None) is not None:  # a compressed runtime module: show its format
        dtype = scheme_label(module.scheme)
    if getattr(module, "sparsity_label", None):  # a pruned linear (slimlm.nn.sparse_linear): pattern and kept share
        base = dtype if getattr(module, "scheme", None) is not None else _dtype_name(module.compute_dtype)
        dtype = f"{base} {module.sparsity_label}"
    if isinstance(getattr(module, "rank", None), int):  # a factorized linear (LowRankLinear): dtype and rank
        dtype = f"{_dtype_name(module.B.dtype)} rank {module.rank}"
        inner = getattr(module, "base", None)
        if isinstance(inner, nn.Module) and (base_info := _linear_info("", inner)) is not None:
            # a linear with a side path (CompensatedLinear): its base's format, then the side path
            dtype = f"{base_info.dtype} + {dtype} side path"
    if isinstance(module, Conv1D):  # weight (in, out)
        return LinearInfo(name, int(module.weight.shape[0]), int(module.weight.shape[1]), dtype)
    if isinstance(module, nn.Linear):
        return LinearInfo(name, module.in_features, module.out_features, dtype)
    # Runtime replacements (QuantLinear, LowRankLinear, ...) expose the Linear interface.
    fin, fout = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(fin, int) and isinstance(fout, int):
        return LinearInfo(name, fin, fout, dtype)
    return None


def list_linears(model: nn.Module) -> tuple[LinearInfo, ...]:
    """Every linear-like module once: one held inside another (a side path's base) is described by its holder."""
    found: list[LinearInfo] = []
    for name, m in model.named_modules():  # parents come before their children
        if found and name.startswith(found[-1].name + "."):
            continue
        info = _linear_info(name, m)
        if info is not None:
            found.append(info)
    return tuple(found)


def _generic_layout(config) -> tuple[int, HeadLayout]:
    """Layers and heads for a family without an adapter, from the standard config names."""
    cfg = config.get_text_config()
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    return int(cfg.num_hidden_layers), HeadLayout(n_heads, n_kv, head_dim)


def model_info(model: nn.Module) -> ModelInfo:
    config = model.config
    params = list(model.parameters())  # deduplicated: a tied weight appears once
    dtype = getattr(model, "dtype", None) or next(p.dtype for p in params if p.is_floating_point())
    if config.model_type in ADAPTERS:
        n_layers, heads = num_layers(config), head_layout(config)
    else:
        n_layers, heads = _generic_layout(config)
    in_emb, out_emb = model.get_input_embeddings(), model.get_output_embeddings()
    in_weight = dict(in_emb.named_parameters(recurse=False)).get("weight")  # None: a lookup into the head's table
    tied = out_emb is not None and in_weight is not None and getattr(out_emb, "weight", None) is in_weight
    reads = getattr(in_emb, "reads", None)  # a SharedQuantEmbedding names the quantized head it reads
    shared = None if reads is None else f"{_name_of(model, in_emb)} reads {reads}"
    kv_bytes = 2 * n_layers * heads.n_kv_heads * heads.head_dim * torch.empty((), dtype=dtype).element_size()
    n_params, size_bytes = measure_size_light(model)  # packed weights of compressed modules included
    kernels = kernel_report(model)  # runs a fast kernel's first-use check if it has not run yet
    return ModelInfo(
        architecture=type(model).__name__,
        model_type=config.model_type,
        n_params=n_params,
        dtype=_dtype_name(dtype),
        size_bytes=size_bytes,
        n_layers=n_layers,
        heads=heads,
        kv_bytes_per_token=kv_bytes,
        tied_embeddings=tied or shared is not None,
        shared_table=shared,
        linears=list_linears(model),
        kernels=kernels if kernels.layers or kernels.choices else None,
    )


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _human(n: float, unit: str, *, binary: bool = False) -> str:
    """134515008 -> '134.5 M'; with binary=True 46080 -> '45.0 KiB'."""
    base, prefixes = (1024, ("", "Ki", "Mi", "Gi", "Ti")) if binary else (1000, ("", "K", "M", "G", "T"))
    for prefix in prefixes:
        if abs(n) < base or prefix == prefixes[-1]:
            return (f"{n:.1f} {prefix}{unit}" if prefix else f"{n:.0f} {unit}").rstrip()
        n /= base
    raise AssertionError("unreachable")


def format_info(info: ModelInfo, *, linears: bool = True) -> str:
    """A readable multi-line table; ``linears=False`` leaves out the per-linear rows."""
    h, kv = info.heads, info.kv_bytes_per_token
    rows = [
        ("architecture", f"{info.architecture} ({info.model_type})"),
        ("parameters", f"{info.n_params:,} ({_human(info.n_params, '')})"),
        ("dtype", info.dtype),
        ("size", f"{_human(info.size_bytes, 'B', binary=True)} ({info.size_bytes:,} bytes)"),
        ("decoder layers", str(info.n_layers)),
        ("heads", f"{h.n_heads} query, {h.n_kv_heads} kv, head dim {h.head_dim}"),
        ("KV cache / token", f"{_human(kv, 'B', binary=True)} ({kv:,} bytes)"),
        ("tied embeddings", (f"yes, one quantized table ({info.shared_table})" if info.shared_table
                             else "yes" if info.tied_embeddings else "no")),  # fmt: skip
        ("linears", str(len(info.linears))),
    ]
    if info.kernels is not None:
        rows.append(("kernels", info.kernels.format()))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}".replace("\n", "\n" + " " * (width + 2)) for k, v in rows]
    if linears and info.linears:
        name_w = max(len("name"), *(len(li.name) for li in info.linears))
        lines.append("")
        runs = {k.layer: f"  [{k.runs}]" for k in info.kernels.layers} if info.kernels else {}
        lines.append(f"  {'name':<{name_w}}  {'in':>7}  {'out':>7}  dtype" + ("  [kernel]" if runs else ""))
        for li in info.linears:
            row = f"  {li.name:<{name_w}}  {li.in_features:>7}  {li.out_features:>7}  {li.dtype}"
            lines.append(row + runs.get(li.name, ""))
    return "\n".join(lines)
