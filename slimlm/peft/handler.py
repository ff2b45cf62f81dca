"""The handlers of the PEFT methods: put the trainable part on, train it through the one loop, report.

Every method trains only its own parameters (everything else is frozen by
:func:`slimlm.train.train` and comes out bit-identical), on next-token CE
or on the KL to the teacher, the objectives of :mod:`slimlm.distill`.
Quantized bases run their reference (dequantizing) path while training, as
in distillation. What trains is said in the log and in the run's report.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor, nn

from slimlm.distill.config import Distill
from slimlm.distill.handler import differentiable_kernels, resolve_teacher
from slimlm.distill.objective import distill_objective
from slimlm.errors import SlimlmError
from slimlm.nn import RuntimeModule
from slimlm.peft.bitfit import bitfit_parameters
from slimlm.peft.config import IA3, Adapters, BitFit, LoRA, PeftTrain, PromptTuning, QLoRA
from slimlm.peft.houlsby import add_adapters
from slimlm.peft.inject import check_rank, inject, seeded
from slimlm.peft.merge import check_mergeable, merge_lora
from slimlm.peft.prompt import SOFT_PROMPT, add_soft_prompt
from slimlm.quant.rtn import RTN, apply_rtn
from slimlm.targets import select_linears
from slimlm.train import TrainRun, train
from slimlm.validate import check_calib

log = logging.getLogger("slimlm.peft")

__all__ = ["apply_adapters", "apply_bitfit", "apply_lora", "apply_prompt_tuning", "train_peft"]


def _count(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def train_peft(model: nn.Module, params: list[nn.Parameter], config: PeftTrain, calib: Tensor, *,
               teacher: nn.Module | None, run: TrainRun | None, method: str,
               summary: str) -> dict[str, Any]:  # fmt: skip
    """Train ``params`` of ``model`` on ``config``'s loss; -> the report (also appended to ``run.reports``)."""
    objective = distill_objective(teacher, Distill(loss=config.loss, temperature=config.temperature))
    log.info("%s (%s): training %s", method, config.loss, summary)
    with differentiable_kernels(model):
        report = train(model, params, objective, calib, config, desc=f"{method} {config.loss}",
                       **(run.train_kwargs() if run else {}))  # fmt: skip
    entry = {"method": method, "trainable": summary, "trainable_params": _count(params), **report.to_json()}
    if run is not None:
        run.reports.append(entry)
    return entry


def apply_lora(model: nn.Module, config: LoRA | IA3, calib: Tensor | None = None, *,
               run: TrainRun | None = None) -> nn.Module:  # fmt: skip
    """LoRA / DoRA / QLoRA / IA3 through HF peft's layers (see :mod:`slimlm.peft.inject`)."""
    name = {"LoRA": "lora", "DoRA": "dora", "QLoRA": "qlora", "IA3": "ia3"}[type(config).__name__]
    calib = check_calib(calib, name, purpose="to train on")
    teacher = resolve_teacher(model, config, run)  # first: a missing teacher is refused before any change
    targets = select_linears(model, config.targets)  # refuses a selection of nothing
    if isinstance(config, LoRA):
        check_rank(targets, config.r)
        if config.merge:
            check_mergeable(targets, requantize=config.requantize)
    if isinstance(config, QLoRA):
        floats = [n for n, m in targets.items() if not isinstance(m, RuntimeModule)]
        if floats:
            apply_rtn(model, RTN(scheme=config.scheme, targets=type(config.targets)(include=tuple(floats))))
    params, _ = inject(model, config)
    bases = sorted({type(getattr(m, "base_layer", m)).__name__ for m in model.modules() if hasattr(m, "base_layer")})
    entry = train_peft(model, params, config, calib, teacher=teacher, run=run, method=name,
                       summary=f"{_count(params)} adapter parameters on {', '.join(bases)} bases")  # fmt: skip
    if isinstance(config, LoRA) and config.merge:
        entry["merge"] = merge_lora(model, calib=calib, requantize=config.requantize)
    return model


def apply_adapters(model: nn.Module, config: Adapters, calib: Tensor | None = None, *,
                   run: TrainRun | None = None) -> nn.Module:  # fmt: skip
    calib = check_calib(calib, "adapters", purpose="to train on")
    teacher = resolve_teacher(model, config, run)
    with seeded(config.seed):  # the bottlenecks' down projections start random
        params = add_adapters(model, config.targets, size=config.size, nonlinearity=config.nonlinearity)
    train_peft(model, params, config, calib, teacher=teacher, run=run, method="adapters",
               summary=f"{_count(params)} parameters in {len(params) // 4} bottlenecks of width {config.size}")
    return model


def apply_prompt_tuning(model: nn.Module, config: PromptTuning, calib: Tensor | None = None, *,
                        run: TrainRun | None = None) -> nn.Module:  # fmt: skip
    calib = check_calib(calib, "prompt_tuning", purpose="to train on")
    teacher = resolve_teacher(model, config, run)
    if hasattr(model, SOFT_PROMPT):
        raise SlimlmError("the model already carries a soft prompt; prompt_tuning runs once per model")
    params = add_soft_prompt(model, n_tokens=config.n_tokens, init=config.init, seed=config.seed)
    train_peft(model, params, config, calib, teacher=teacher, run=run, method="prompt_tuning",
               summary=f"{_count(params)} parameters: {config.n_tokens} soft prompt embeddings")
    return model


def apply_bitfit(model: nn.Module, config: BitFit, calib: Tensor | None = None, *,
                 run: TrainRun | None = None) -> nn.Module:  # fmt: skip
    calib = check_calib(calib, "bitfit", purpose="to train on")
    teacher = resolve_teacher(model, config, run)
    params, summary = bitfit_parameters(model, config.targets, zero_biases=config.zero_biases)
    train_peft(model, params, config, calib, teacher=teacher, run=run, method="bitfit", summary=summary)
    return model
