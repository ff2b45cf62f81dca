"""Export a slimlm checkpoint as a compressed-tensors model directory (llm-compressor's format).

The directory is a plain HF model directory whose ``config.json`` carries a
``quantization_config`` (``quant_method: compressed-tensors``) and whose safetensors hold, per
quantized linear, the tensors compressed-tensors defines (:mod:`slimlm.export.ct_pack`). Stock
transformers with the ``compressed-tensors`` package loads it (``AutoModelForCausalLM.from_pretrained``,
on CPU too), and so does vLLM. Checked against compressed-tensors 0.20.1 and transformers 5.24.

What goes out, per slimlm module (the table is :data:`WRITERS`):

=========================  ==================================================================
QuantLinear, int 2..8 bit  ``pack-quantized`` weight-only (W4A16, W8A16, ...), group or channel
                           (per-tensor goes out as channel: the scale repeated per row),
                           symmetric or with zero points, code for code
SparseQuantLinear (int)    the same, dense: its pruned codes are the code of 0.0
W8A8Linear (per token)     ``int-quantized``: int8 per-channel weights, int8 activations
                           quantized per token at run time (``dynamic: true``)
SparseLinear (float)       a dense float weight with its zeros, listed in ``ignore``
float nn.Linear            unchanged, listed in ``ignore`` (e.g. lm_head)
=========================  ==================================================================

One config group per distinct scheme (targets ``["Linear"]`` when there is one, the module names
when there are several). Everything else is refused in one line naming the nearest recipe that
exports: NF4, k-means, ternary and binary weights, LLM.int8 outlier modules, per-tensor W8A8 (one
activation scale per call, which neither format nor vLLM has), a W8A8 linear dividing its input by
a smoothing vector at run time, and GPT-2-style Conv1D models.

Loading in transformers (5.24, compressed-tensors 0.20.1, CPU): symmetric exports load with plain
``from_pretrained(dir)`` (the weights stay packed until the first forward decompresses them).
Asymmetric ones need ``quantization_config=CompressedTensorsConfig(dequantize=True)`` (formerly
``run_compressed=False``): the default path builds the zero point unpacked on its meta model and
refuses the packed one that compressed-tensors' own compressor writes and vLLM reads (llm-compressor's
asymmetric exports fail the same way). ``dequantize=True`` also drops W8A8's activation quantization
(a dense model); the default path runs it, per token, as ``absmax / 127.5`` in ``[-128, 127]``
where slimlm (and vLLM) use ``absmax / 127`` in ``[-127, 127]``.

Sparsity is not kept: compressed-tensors dropped its sparse compressors in 0.15, so pruned linears
go out dense with their zeros (logged). Structurally pruned models go out with their new shapes,
which their config already states (a checkpoint whose shapes its config cannot build does not load,
so it is refused before anything is written).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.export.ct_pack import int_quantized_tensors, pack_quantized_tensors
from slimlm.formats import codec
from slimlm.formats.granularity import PerGroup
from slimlm.formats.scheme import IntScheme, QuantizedWeight
from slimlm.fsutil import atomic_dir
from slimlm.io import compressed_modules, load_compressed
from slimlm.models.adapters import get_adapter
from slimlm.nn import PackedLinear, QuantLinear, SparseLinear, SparseQuantLinear, W8A8Linear, float_embeddings

log = logging.getLogger("slimlm.export")

PACK_QUANTIZED, INT_QUANTIZED, MIXED = "pack-quantized", "int-quantized", "mixed-precision"
WEIGHT_ONLY_HINT = "nearest exportable recipes: gptq-int4-g64, awq-int4-g64 or rtn-int4-g64 (int weights)"
W8A8_HINT = "nearest exportable recipes: smoothquant or w8a8-token (int8 per-token activations)"
_SMOOTH = "smooth_scale"


@dataclass(frozen=True)
class CTModule:
    """One linear as it goes out: its scheme (None: float, ignored) and its tensors (no prefix)."""

    tensors: dict[str, Tensor]
    format: str | None = None
    weights: dict[str, Any] | None = None
    input_activations: dict[str, Any] | None = None
    sparse: bool = False

    @property
    def key(self) -> tuple:
        acts = tuple(sorted((self.input_activations or {}).items()))
        return self.format, tuple(sorted((self.weights or {}).items())), acts


@dataclass
class Plan:
    modules: dict[str, CTModule] = field(default_factory=dict)

    def groups(self) -> dict[tuple, list[str]]:
        """Distinct quantized schemes -> the module names using them, in model order."""
        out: dict[tuple, list[str]] = {}
        for name, m in self.modules.items():
            if m.format is not None:
                out.setdefault(m.key, []).append(name)
        return out


# --- what each slimlm module becomes -----------------------------------------------------------


def weight_args(s: IntScheme) -> dict[str, Any]:
    """compressed-tensors QuantizationArgs (as a dict) of a slimlm int weight scheme."""
    args = {"num_bits": s.bits, "type": "int", "symmetric": s.symmetric, "dynamic": False}
    if isinstance(s.granularity, PerGroup):
        return {**args, "strategy": "group", "group_size": s.granularity.size}
    return {**args, "strategy": "channel"}  # PerChannel, and PerTensor repeated per row


TOKEN_INT8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def _qweight(m: PackedLinear) -> QuantizedWeight:
    """The dense codes, scales and zero points of a packed linear, exactly as the checkpoint stores them."""
    # PackedLinear.portable_tensors is the dense codec form (SparseQuantLinear overrides it with its
    # sparse storage, whose dense codes its kernel holds); extras such as a smoothing vector are dropped.
    tensors = {k: v for k, v in PackedLinear.portable_tensors(m).items() if k != _SMOOTH}
    return codec.unpack(tensors, m.scheme, m.shape)


def _refuse_extras(name: str, m: PackedLinear) -> None:
    if _SMOOTH in m.portable_tensors():
        raise SlimlmError(f"{name} divides its input by a smoothing vector at run time, which compressed-tensors "
                          f"cannot hold; {W8A8_HINT}, which fold the smoothing into the previous op")  # fmt: skip


def _weight_only(name: str, m: PackedLinear, scale_dtype: torch.dtype) -> CTModule:
    if not isinstance(m.scheme, IntScheme):
        raise SlimlmError(f"{name} holds {type(m.scheme).__name__} weights, which compressed-tensors cannot hold "
                          f"(it stores int2..8 weights with scales); {WEIGHT_ONLY_HINT}")  # fmt: skip
    _refuse_extras(name, m)
    tensors = pack_quantized_tensors(_qweight(m), scale_dtype=scale_dtype)
    return CTModule(tensors, PACK_QUANTIZED, weight_args(m.scheme), sparse=isinstance(m, SparseQuantLinear))


def _w8a8(name: str, m: W8A8Linear, scale_dtype: torch.dtype) -> CTModule:
    _refuse_extras(name, m)
    tensors = int_quantized_tensors(_qweight(m), scale_dtype=scale_dtype)
    return CTModule(tensors, INT_QUANTIZED, weight_args(m.scheme), TOKEN_INT8)


def _sparse_float(name: str, m: SparseLinear, scale_dtype: torch.dtype) -> CTModule:
    return CTModule({"weight": m.dequantized_weight().to(m.compute_dtype)}, sparse=True)  # (out, in), zeros kept


# Exact types: a subclass (W8A8PerTensorLinear) is a different format and is refused by name below.
WRITERS: dict[type, Callable[[str, Any, torch.dtype], CTModule]] = {
    QuantLinear: _weight_only,
    SparseQuantLinear: _weight_only,
    W8A8Linear: _w8a8,
    SparseLinear: _sparse_float,
}
REFUSALS = {
    "W8A8PerTensorLinear": "quantizes activations with one scale per call, which vLLM's int8 path does not run "
                           f"(it takes dynamic per-token or calibrated static scales); {W8A8_HINT}",
    "OutlierLinear": f"is an LLM.int8 outlier decomposition, which compressed-tensors cannot hold; {W8A8_HINT}",
    "CompensatedLinear": "holds a float low-rank side path beside its quantized base, which compressed-tensors "
                         "cannot hold; compress with the same recipe without its eora step to export",
    "LowRankLinear": "is a low-rank factorization (two thin matrices), which compressed-tensors cannot hold; "
                     "export --format hf writes it multiplied out (dense)",
}  # fmt: skip


def plan_export(model: nn.Module, *, scale_dtype: torch.dtype) -> Plan:
    """What each compressed module of ``model`` becomes; a refusal names the first that cannot go out."""
    plan = Plan()
    for name, m in compressed_modules(model).items():
        writer = WRITERS.get(type(m))
        if writer is None:
            why = REFUSALS.get(type(m).__name__, f"has no compressed-tensors form; {WEIGHT_ONLY_HINT}")
            raise SlimlmError(f"{name} ({type(m).__name__}) {why}")
        plan.modules[name] = writer(name, m, scale_dtype)
    return plan


# --- the quantization_config --------------------------------------------------------------------


def float_linears(model: nn.Module, plan: Plan) -> list[str]:
    """Every linear left in float (plain nn.Linear, or a pruned float linear going out dense)."""
    plain = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]  # subclasses too (MHA out_proj)
    return plain + [n for n, m in plan.modules.items() if m.format is None]


def quantization_config(model: nn.Module, plan: Plan) -> dict[str, Any]:
    """``config.json``'s ``quantization_config``, built and validated by compressed-tensors' own models."""
    try:  # heavy (2.4 s), and needed by this export only
        import compressed_tensors
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError:
        raise SlimlmError("the compressed-tensors export needs the compressed-tensors package: "
                          "pip install 'compressed-tensors>=0.20'") from None

    groups = plan.groups()
    config_groups, formats = {}, set()
    for i, ((fmt, _, _), names) in enumerate(groups.items()):
        first = plan.modules[names[0]]
        acts = first.input_activations
        config_groups[f"group_{i}"] = QuantizationScheme(
            targets=["Linear"] if len(groups) == 1 else names, format=fmt, weights=QuantizationArgs(**first.weights),
            input_activations=QuantizationArgs(**acts) if acts else None)  # fmt: skip
        formats.add(fmt)
    qc = QuantizationConfig(config_groups=config_groups, format=formats.pop() if len(formats) == 1 else MIXED,
                            quantization_status="compressed", ignore=float_linears(model, plan))  # fmt: skip
    # The keys ModelCompressor.update_config writes beside the config (llm-compressor's layout).
    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors", "sparsity_config": {},
            "transform_config": {}, **qc.model_dump(mode="json", exclude={"quant_method"})}  # fmt: skip


# --- writing -----------------------------------------------------------------------------------


def _scale_dtype(model: nn.Module) -> torch.dtype:
    """float16 scales for a float16 model, float32 (exact) otherwise."""
    if model.dtype == torch.float16:
        return torch.float16
    if model.dtype == torch.bfloat16:
        log.warning("bfloat16 model: scales go out as float32 (exact), but readers that cast them to the model's "
                    "dtype (transformers' default path, vLLM) round slimlm's float16 scales to bfloat16 "
                    "(relative error <= 2^-8); transformers with dequantize=True keeps them exact")  # fmt: skip
    return torch.float32


def ct_state_dict(model: nn.Module, plan: Plan) -> dict[str, Tensor]:
    """The model's tensors with each planned module's slimlm tensors replaced by its compressed-tensors ones."""
    prefixes = tuple(f"{name}." for name in plan.modules)
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith(prefixes) or k.endswith(".bias") and k[: -len(".bias")] in plan.modules}  # fmt: skip
    for name, m in plan.modules.items():
        state.update({f"{name}.{k}": v.contiguous() for k, v in m.tensors.items()})
    return state


def _log_plan(plan: Plan, n_float: int) -> None:
    sparse = sum(m.sparse for m in plan.modules.values())
    if sparse:
        log.warning("%d pruned linears go out dense with their zeros: compressed-tensors dropped its sparse "
                    "compressors in 0.15, so the export is no smaller than its dense equivalent", sparse)  # fmt: skip
    bits = sorted({m.weights["num_bits"] for m in plan.modules.values() if m.weights})
    if any(32 % b for b in bits):
        log.warning("%s-bit weights use compressed-tensors' dense int32 packing (0.20 and later); older readers "
                    "(and vLLM before it) expect padded words and misread them", "/".join(map(str, bits)))  # fmt: skip
    if any(m.weights and m.weights["num_bits"] == 8 and not m.weights["symmetric"] for m in plan.modules.values()):
        log.warning("asymmetric int8 weights: transformers loads them, but vLLM's Marlin kernels take zero points "
                    "at 4 bits only; use int8 symmetric (e.g. int8-channel-sym) for vLLM")  # fmt: skip
    log.info("compressed-tensors export: %d quantized linears in %d groups, %d float (ignored)",
             sum(m.format is not None for m in plan.modules.values()), len(plan.groups()), n_float)  # fmt: skip


def export_compressed_tensors(checkpoint: str | os.PathLike, out: str | os.PathLike, *,
                              overwrite: bool = False) -> Path:  # fmt: skip
    """Write the slimlm checkpoint ``checkpoint`` as a compressed-tensors model directory ``out``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SlimlmError(f"{out} already exists; pass --overwrite to replace it")
    model, tokenizer = load_compressed(checkpoint)
    if get_adapter(model).linear_kind == "conv1d":
        raise SlimlmError(f"{model.config.model_type} stores its linears as Conv1D, which compressed-tensors does "
                          "not quantize; export it with --format hf or gguf")  # fmt: skip
    # compressed-tensors quantizes linears only: an embedding reading the quantized head's table goes out as
    # that table dequantized (float), beside the quantized head, untied
    float_embeddings(model)
    plan = plan_export(model, scale_dtype=_scale_dtype(model))
    if not plan.groups():
        raise SlimlmError(f"{checkpoint} has no quantized linears to export as compressed-tensors; "
                          "use --format hf for a float (or pruned) model")  # fmt: skip
    qconfig = quantization_config(model, plan)
    _log_plan(plan, len(qconfig["ignore"]))
    state = ct_state_dict(model, plan)
    lm_head = get_adapter(model).lm_head
    if lm_head in plan.modules:  # a quantized lm_head has its own tensors: the embedding is no longer shared
        model.config.tie_word_embeddings = False
        model.config.get_text_config().tie_word_embeddings = False
    model.config.quantization_config = qconfig
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    log.info("wrote compressed-tensors model to %s", out)
    return out
