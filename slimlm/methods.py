"""THE method registry: every compression method once, with everything the rest of slimlm asks of it.

    name          the recipe's ``method:`` key                 "gptq"
    config        its frozen config dataclass                  GPTQ
    apply         the handler (model, config, calib) -> model  apply_gptq
    calibration   whether it needs calibration token ids       True, or a function of the config
    lazy          how it runs one block in memory at a time    (model, config, calib, sink) -> None, or None
    lazy_check    what a lazy run of it refuses                 (config) -> None, raises SlimlmError
    trains        whether it trains (its handler then takes ``run=TrainRun``: teacher, resumable state)
    original      its handler takes ``original=``: the model as it was before the recipe's first step
                  (the float weights a quantization step replaced)
    summary       one line for ``slimlm recipes`` and the docs

``apply`` and ``apply_all`` (:mod:`slimlm.api`), recipe parsing
(:mod:`slimlm.recipe`), lazy compression (:mod:`slimlm.pipelines.lazy`),
compressed drafts and the CLI's listing all read :data:`METHODS`; nothing
else keeps a table of methods. Adding a method is one algorithm file, one
config + handler, and one line below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor, nn

from slimlm.distill.config import Distill
from slimlm.distill.handler import apply_distill
from slimlm.errors import SlimlmError
from slimlm.lowrank import ASVD, SVD, SVDLLM, apply_lowrank
from slimlm.lowrank.compensate_handler import EoRA, apply_eora
from slimlm.lowrank.lazy import check_lowrank_lazy, lowrank_lazy
from slimlm.peft.config import IA3, Adapters, BitFit, DoRA, LoRA, PromptTuning, QLoRA
from slimlm.peft.handler import apply_adapters, apply_bitfit, apply_lora, apply_prompt_tuning
from slimlm.prune.gradual import GradualMagnitude, apply_gradual_magnitude
from slimlm.prune.handlers import Magnitude, SparseGPT, Wanda, apply_magnitude, apply_sparsegpt, apply_wanda
from slimlm.prune.structured_config import PruneDepth, PruneWidth, Structured
from slimlm.prune.structured_handler import apply_prune_depth, apply_prune_width, apply_structured
from slimlm.quant.awq_handler import AWQ, apply_awq
from slimlm.quant.gptq_handler import GPTQ, apply_gptq
from slimlm.quant.lazy import LazyRun, awq_lazy, check_gptq_lazy, check_mixed_lazy, gptq_lazy, mixed_lazy, rtn_lazy
from slimlm.quant.llm_int8 import LLMInt8, apply_llm_int8
from slimlm.quant.mixed_handler import MixedPrecision, apply_mixed
from slimlm.quant.qat import QAT, apply_qat
from slimlm.quant.rtn import RTN, apply_rtn
from slimlm.quant.w8a8 import W8A8, SmoothQuant, apply_smoothquant, apply_w8a8

Handler = Callable[[nn.Module, Any, Tensor | None], nn.Module]


@dataclass(frozen=True)
class Method:
    name: str
    config: type
    apply: Handler
    summary: str
    calibration: bool | Callable[[Any], bool] = False
    lazy: LazyRun | None = None
    lazy_check: Callable[[Any], None] | None = None
    trains: bool = False
    original: bool = False

    def needs_calibration(self, config: Any) -> bool:
        return self.calibration(config) if callable(self.calibration) else self.calibration


_ALL = (
    # quantization
    Method("rtn", RTN, apply_rtn, "round-to-nearest weights (any scheme): the baseline", lazy=rtn_lazy),
    Method("gptq", GPTQ, apply_gptq, "GPTQ: OBS rounding column by column (act-order, groups)", calibration=True,
           lazy=gptq_lazy, lazy_check=check_gptq_lazy),
    Method("awq", AWQ, apply_awq, "AWQ: activation-aware scales and clipping, then rounding", calibration=True,
           lazy=awq_lazy),
    Method("w8a8", W8A8, apply_w8a8, "int8 weights and int8 activations (per tensor or per token)"),
    Method("smoothquant", SmoothQuant, apply_smoothquant, "SmoothQuant: migrate activation outliers, then W8A8",
           calibration=True),
    Method("llm_int8", LLMInt8, apply_llm_int8, "LLM.int8(): outlier columns in float, the rest W8A8",
           calibration=lambda c: c.calibrated or c.smooth_alpha is not None),
    Method("mixed_precision", MixedPrecision, apply_mixed, "a scheme per linear under a bits-per-weight budget",
           calibration=True, lazy=mixed_lazy, lazy_check=check_mixed_lazy),
    Method("qat", QAT, apply_qat, "quantization-aware training (STE), optionally distilled", calibration=True,
           trains=True),
    Method("eora", EoRA, apply_eora, "EoRA: a float low-rank side path for each quantized linear's error "
           "(after gptq/rtn)", calibration=lambda c: c.whiten, original=True),
    # pruning
    Method("magnitude", Magnitude, apply_magnitude, "prune the smallest |W| (unstructured or N:M)"),
    Method("wanda", Wanda, apply_wanda, "Wanda: prune by |W| x input norm", calibration=True),
    Method("sparsegpt", SparseGPT, apply_sparsegpt, "SparseGPT: OBS pruning with weight updates (+ joint int)",
           calibration=True),
    Method("gradual_magnitude", GradualMagnitude, apply_gradual_magnitude,
           "gradual magnitude pruning on a cubic schedule, with training", calibration=True, trains=True),
    Method("prune_width", PruneWidth, apply_prune_width, "remove attention heads and MLP neurons", calibration=True),
    Method("prune_depth", PruneDepth, apply_prune_depth, "remove whole decoder layers", calibration=True),
    Method("structured", Structured, apply_structured, "structured pruning to a parameter budget (width or depth)",
           calibration=True),
    # low-rank factorization
    Method("svd", SVD, apply_lowrank, "truncated SVD of each linear into two thin matrices (no calibration)",
           lazy=lowrank_lazy, lazy_check=check_lowrank_lazy),
    Method("asvd", ASVD, apply_lowrank, "ASVD: SVD with input channels scaled by activation magnitude",
           calibration=True, lazy=lowrank_lazy, lazy_check=check_lowrank_lazy),
    Method("svd_llm", SVDLLM, apply_lowrank, "SVD-LLM: SVD whitened by the inputs' Cholesky factor "
           "(truncation-aware)", calibration=True, lazy=lowrank_lazy, lazy_check=check_lowrank_lazy),
    # recovery
    Method("distill", Distill, apply_distill, "knowledge distillation from the uncompressed model (logit, "
           "hidden-state, sequence-level)", calibration=True, trains=True),
    # parameter-efficient fine-tuning (frozen base; loss ce = adaptation, kl = recovery from the teacher)
    Method("lora", LoRA, apply_lora, "LoRA: train low-rank updates B A beside frozen linears (HF peft layers)",
           calibration=True, trains=True),
    Method("dora", DoRA, apply_lora, "DoRA: LoRA on the direction plus a trained per-row magnitude (float bases)",
           calibration=True, trains=True),
    Method("qlora", QLoRA, apply_lora, "QLoRA: LoRA on a quantized frozen base (NF4 by default)", calibration=True,
           trains=True),
    Method("ia3", IA3, apply_lora, "IA3: learned rescaling of k, v and the MLP's down projection input",
           calibration=True, trains=True),
    Method("adapters", Adapters, apply_adapters, "Houlsby bottleneck adapters after attention and MLP",
           calibration=True, trains=True),
    Method("prompt_tuning", PromptTuning, apply_prompt_tuning, "prompt tuning: trained soft prompt embeddings",
           calibration=True, trains=True),
    Method("bitfit", BitFit, apply_bitfit, "BitFit: train biases and norm weights only", calibration=True,
           trains=True),
)

METHODS: dict[str, Method] = {m.name: m for m in _ALL}
METHOD_OF: dict[type, Method] = {m.config: m for m in _ALL}


def method_for(config: Any) -> Method:
    """The registry entry of ``config``'s type, or a one-line refusal naming the known configs."""
    method = METHOD_OF.get(type(config))
    if method is None:
        names = ", ".join(t.__name__ for t in METHOD_OF)
        raise SlimlmError(f"no method for {type(config).__name__}; known configs: {names}")
    return method


def method_named(name: str) -> Method:
    method = METHODS.get(name)
    if method is None:
        raise SlimlmError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return method
