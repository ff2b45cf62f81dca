"""apply_distill: train a compressed student towards its teacher, keeping what compression fixed.

What trains (Distill's ``trainable`` parts, said in the log and the report):
every float parameter that remains in the student (float linears, norms,
embeddings and a float lm_head) and the surviving weights of pruned linears
(each SparseLinear becomes a :class:`~slimlm.nn.masked.MaskedLinear` for the
run and goes back with the same mask, so sparsity and N:M patterns are
kept) and the factors of low-rank linears (their rank stays). Packed
quantized weights (QuantLinear, W8A8, sparse-quantized) stay as they are: a quantized student trains its norms, embeddings, biases of
float layers and lm_head around fixed integer codes and scales.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from slimlm.distill.config import Distill
from slimlm.distill.hidden import HiddenProjection, check_layer_map, layer_map
from slimlm.distill.objective import distill_objective
from slimlm.distill.sequence import teacher_sequences
from slimlm.distill.teacher import frozen_copy
from slimlm.errors import SlimlmError
from slimlm.models import load_model
from slimlm.kernels import REFERENCE
from slimlm.nn import OutlierLinear, PackedLinear, RuntimeModule, SparseLinear, W8A8Linear
from slimlm.nn.masked import MaskedLinear
from slimlm.targets import Targets, candidate_linears, replace_module, select_linears
from slimlm.train import TrainRun, train
from slimlm.validate import check_calib

log = logging.getLogger("slimlm.distill")

__all__ = ["apply_distill", "resolve_teacher", "trainable_parameters"]

NO_TEACHER = ("distill needs a teacher: run it in a recipe after a compression step (the teacher is then the model "
              "before the recipe's first step), set teacher: <model>, or call apply(model, Distill(...), calib, "
              "teacher=base_model)")  # fmt: skip


def _vocab(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    n = getattr(head, "out_features", None)
    return int(n) if isinstance(n, int) else int(head.weight.shape[0])


def resolve_teacher(model: nn.Module, config: Distill, run: TrainRun | None) -> nn.Module | None:
    """The frozen teacher: ``config.teacher`` loaded, else the run's; None when ``config`` needs none."""
    if not config.needs_teacher:
        return None
    if config.teacher is not None:
        loaded, tokenizer = load_model(config.teacher)
        if run is not None and run.tokenizer is not None and tokenizer.get_vocab() != run.tokenizer.get_vocab():
            raise SlimlmError(f"teacher {config.teacher} has another tokenizer than the student: distillation "
                              f"compares next-token distributions token by token; use a teacher with the "
                              f"student's tokenizer")  # fmt: skip
        teacher = frozen_copy(loaded)
    elif run is not None and run.teacher is not None:
        teacher = run.teacher
    else:
        raise SlimlmError(NO_TEACHER)
    if _vocab(teacher) != _vocab(model):
        raise SlimlmError(f"the teacher's vocabulary ({_vocab(teacher)} tokens) differs from the student's "
                          f"({_vocab(model)}): distillation compares next-token distributions token by token; "
                          f"use a teacher with the student's tokenizer")  # fmt: skip
    device = next(model.parameters()).device
    return teacher.to(device)


def trainable_parameters(model: nn.Module, targets: Targets | None = None,
                         ) -> tuple[list[nn.Parameter], dict[str, MaskedLinear], str]:  # fmt: skip
    """Swap SparseLinears for MaskedLinears; -> (the float parameters to train, the swapped modules, a summary).

    Block linears that ``targets`` leaves out stay fixed, as do packed modules.
    """
    fixed = set(candidate_linears(model)) - set(select_linears(model, targets or Targets()))
    masked = {name: MaskedLinear.from_sparse(m) for name, m in model.named_modules() if isinstance(m, SparseLinear)}
    for name, module in masked.items():
        replace_module(model, name, module)
    packed = {name for name, m in model.named_modules() if isinstance(m, RuntimeModule) and not m.trainable_floats}
    skip = packed | fixed
    params, seen = [], set()
    for name, module in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in skip):
            continue  # a packed module's codes, scales and bias stay fixed, as do untargeted linears
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    n = sum(p.numel() for p in params)
    summary = f"{n / 1e6:.1f}M float parameters ({len(masked)} pruned linears with fixed masks, " \
              f"{len(packed)} packed modules and {len(fixed)} untargeted linears fixed)"  # fmt: skip
    return params, masked, summary


def check_differentiable(model: nn.Module) -> None:
    """Refuse layers that quantize activations: rounding them passes no gradient to what comes before."""
    if blocked := sorted({type(m).__name__ for m in model.modules() if isinstance(m, (W8A8Linear, OutlierLinear))}):
        raise SlimlmError(f"distill cannot train through {', '.join(blocked)}: rounding activations has no "
                          f"gradient; put the distill step before the W8A8 / LLM.int8 step")  # fmt: skip


@contextmanager
def differentiable_kernels(model: nn.Module) -> Iterator[None]:
    """Weight-only packed linears run the reference path for the run (the fast kernels have no
    backward), their own kernels after; layers that quantize activations are refused."""
    check_differentiable(model)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    kernels = [m.kernel for m in packed]
    for m in packed:
        m.set_weight_kernel(REFERENCE)
    try:
        yield
    finally:
        for m, kernel in zip(packed, kernels):
            m.set_weight_kernel(kernel)


def _hidden_setup(model: nn.Module, teacher: nn.Module, config: Distill) -> tuple[list, nn.Module | None]:
    """The layer pairs (given or found) and, when widths differ, a trainable projection."""
    pairs = list(config.layer_map) if config.layer_map is not None else layer_map(model, teacher)
    check_layer_map(pairs, model.config.num_hidden_layers, teacher.config.num_hidden_layers)
    d_s, d_t = model.config.hidden_size, teacher.config.hidden_size
    projection = HiddenProjection(d_s, d_t).to(next(model.parameters()).device) if d_s != d_t else None
    log.info("distill: hidden-state loss over layers (student, teacher) %s%s", pairs,
             f", projection {d_s} -> {d_t}" if projection is not None else "")  # fmt: skip
    return pairs, projection


def apply_distill(model: nn.Module, config: Distill, calib: Tensor | None = None, *,
                  run: TrainRun | None = None) -> nn.Module:  # fmt: skip
    """Train ``model`` (the student) towards the teacher on ``calib`` (N, L) ids or on the teacher's text."""
    calib = check_calib(calib, "distill", purpose="to train on")
    check_differentiable(model)
    teacher = resolve_teacher(model, config, run)
    pairs, projection = _hidden_setup(model, teacher, config) if config.hidden_weight > 0 else ([], None)
    data = calib
    if config.data == "teacher":
        prompts = calib[: config.gen_samples, : config.prompt_len]  # (n, P)
        data = teacher_sequences(teacher, prompts, new_tokens=config.seq_len - config.prompt_len)  # (n, seq_len)
    params, masked, summary = trainable_parameters(model, config.targets)
    log.info("distill (%s): training %s", config.loss, summary)
    extra = [] if projection is None else list(projection.parameters())
    objective = distill_objective(teacher, config, pairs=pairs, projection=projection)
    with differentiable_kernels(model):
        report = train(model, params + extra, objective, data, config, desc=f"distill {config.loss}",
                       **(run.train_kwargs() if run else {}))  # fmt: skip
    for name, module in masked.items():
        replace_module(model, name, module.to_sparse_linear())
    if run is not None:
        run.reports.append({"method": "distill", "trainable": summary, **report.to_json()})
    return model
