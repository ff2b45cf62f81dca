"""EoRA config and handler: a float low-rank side path beside each quantized linear.

A recipe step after the quantization step::

    - method: gptq
      scheme: int3-g64
    - method: eora
      rank: 32

The residual ``W - dequant(Q(W))`` needs the float weight the quantization
step replaced, which the quantized model no longer holds. The recipe runner
(:func:`slimlm.api.apply_all`) keeps the model as it was before the recipe's
first step (the copy distillation uses as its teacher) and hands it to this
step as ``original``; from Python, ``apply(qmodel, EoRA(rank=32), calib,
original=float_model)``. The residual is only the quantization error when
every weight outside the quantized linears is still the original's, so a
step that folds scales into norms or neighbouring layers first (AWQ,
SmoothQuant) or trains them (QAT, distillation) is refused.

Calibration walks the blocks like GPTQ (:func:`slimlm.calib.calibrate_linears`):
each linear's Gram matrix is gathered on the inputs of the model quantized and
compensated up to that block; the algorithm is
:func:`slimlm.lowrank.compensate.compensation`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from slimlm.calib.runner import calibrate_linears
from slimlm.calib.stats import LinearStats, StatsSpec
from slimlm.errors import SlimlmError
from slimlm.lowrank.compensate import compensation
from slimlm.nn import SIDE_DTYPES, CompensatedLinear, RuntimeModule, linear_weight
from slimlm.targets import Targets, check_targets, match_override, replace_module, select_linears
from slimlm.validate import check_bool, check_calib, check_pos_int

log = logging.getLogger("slimlm.lowrank")

AFTER = "put eora after a gptq, rtn or sparsegpt step"


@dataclass(frozen=True)
class EoRA:
    """Compensate each quantized target linear with a float side path of rank ``rank``.

    ``overrides``: (glob, rank) pairs, the first match wins. ``whiten``: minimise
    the layer's output error on calibration inputs (EoRA); ``False``: plain SVD
    of the residual. ``damp``: Cholesky dampening as a fraction of the Gram
    matrix's mean diagonal. ``side_dtype``: what the factors are stored in (float16 halves
    the extra bits per weight of float32 at no measurable cost; they compute in the input's
    dtype). ``batch_size``: calibration sequences per forward.
    """

    rank: int = 32
    targets: Targets = field(default_factory=Targets)
    overrides: tuple[tuple[str, int], ...] = ()
    whiten: bool = True
    damp: float = 0.01
    side_dtype: str = "float16"
    batch_size: int = 8

    def __post_init__(self) -> None:
        check_pos_int("rank", self.rank, "the side path's rank, e.g. 32")
        object.__setattr__(self, "overrides", tuple((p, r) for p, r in self.overrides))
        for pattern, rank in self.overrides:
            if not isinstance(pattern, str):
                raise SlimlmError(f"overrides map glob patterns to ranks, e.g. {{'*.mlp.down_proj': 64}}; "
                                  f"got key {pattern!r}")  # fmt: skip
            check_pos_int(f"the rank of override {pattern!r}", rank, "a side path rank, e.g. 64")
        check_targets(self.targets)
        check_bool("whiten", self.whiten)
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0.0 <= self.damp <= 1.0:
            raise SlimlmError(f"damp must be a number in [0, 1] (a fraction of the Gram matrix's mean diagonal, "
                              f"e.g. 0.01), got {self.damp!r}")  # fmt: skip
        if self.side_dtype not in SIDE_DTYPES:
            raise SlimlmError(f"side_dtype must be one of {', '.join(SIDE_DTYPES)}, got {self.side_dtype!r}")
        check_pos_int("batch_size", self.batch_size, "calibration sequences per forward, e.g. 8")

    def rank_for(self, name: str) -> int:
        return match_override(name, self.overrides) or self.rank


@dataclass(frozen=True)
class _Job:
    base: RuntimeModule  # the quantized linear now in the model
    W: Tensor  # (out, in) its original float weight
    rank: int


def _check_coordinates(model: nn.Module, original: nn.Module) -> None:
    """Every parameter outside the runtime modules is still the original's (else the residual is not the
    quantization error: AWQ/SmoothQuant fold scales into norms and neighbours, QAT trains them)."""
    inside = [n for n, m in model.named_modules() if isinstance(m, RuntimeModule)]
    theirs = dict(original.named_parameters())
    for name, p in model.named_parameters():
        if any(name.startswith(r + ".") for r in inside):
            continue
        q = theirs.get(name)
        if q is None or q.shape != p.shape or not torch.equal(q.to(p.device), p):
            raise SlimlmError(f"eora needs every weight outside the quantized linears as it was before the recipe, "
                              f"but {name} changed (awq/smoothquant fold scales, training moves it); {AFTER}")  # fmt: skip


def _original_weight(original: nn.Module, name: str, base: RuntimeModule) -> Tensor:
    try:
        module = original.get_submodule(name)
    except AttributeError:
        raise SlimlmError(f"the original model has no {name}; it must be the model before the recipe") from None
    if isinstance(module, RuntimeModule):
        raise SlimlmError(f"the original model's {name} is already compressed ({type(module).__name__}); "
                          f"pass the float model from before the quantization step")  # fmt: skip
    W, _ = linear_weight(module)  # (out, in), also for GPT-2's Conv1D
    if tuple(W.shape) != (base.out_features, base.in_features):
        raise SlimlmError(f"the original {name} is {tuple(W.shape)} but the quantized one is "
                          f"{(base.out_features, base.in_features)}; pass the model from before the recipe")  # fmt: skip
    return W


def plan_compensation(model: nn.Module, config: EoRA, original: nn.Module | None) -> dict[str, _Job]:
    """What each quantized target gets; every refusal comes here, before the model changes."""
    if original is None:
        raise SlimlmError("eora needs the float weights that quantization replaced: run it in a recipe after the "
                          "quantization step, or pass original=<the float model> to apply()")  # fmt: skip
    chosen = select_linears(model, config.targets)
    done = [n for n, m in chosen.items() if isinstance(m, CompensatedLinear)]
    if done:
        raise SlimlmError(f"{done[0]} is already compensated; use one eora step (its rank sets the side path)")
    quantized = {n: m for n, m in chosen.items() if isinstance(m, RuntimeModule)}
    if not quantized:
        raise SlimlmError(f"eora found no quantized linear among its {len(chosen)} targets (e.g. "
                          f"{next(iter(chosen))}); {AFTER}")  # fmt: skip
    if len(quantized) < len(chosen):
        log.info("eora: %d float targets left as they are", len(chosen) - len(quantized))
    _check_coordinates(model, original)
    jobs = {}
    for name, base in quantized.items():
        rank, most = config.rank_for(name), min(base.in_features, base.out_features)
        if rank > most:
            raise SlimlmError(f"rank {rank} exceeds min(in, out) = {most} of {name}; use a rank in 1..{most}")
        jobs[name] = _Job(base, _original_weight(original, name, base), rank)
    return jobs


def _compensate(model: nn.Module, name: str, job: _Job, H: Tensor | None, config: EoRA) -> None:
    A, B, dropped = compensation(job.W, job.base.dequantized_weight(), H, job.rank, damp=config.damp)
    log.debug("eora %s: rank %d leaves %.3g of the residual's energy", name, job.rank, dropped)
    dtype, device = getattr(torch, config.side_dtype), job.W.device
    A, B = A.to(device, dtype), B.to(device, dtype)
    if not (A.isfinite().all() and B.isfinite().all()):
        raise SlimlmError(f"the side path of {name} overflows {config.side_dtype}; use side_dtype: float32")
    replace_module(model, name, CompensatedLinear(job.base, A, B))


def apply_eora(model: nn.Module, config: EoRA, calib: Tensor | None = None, *,
               original: nn.Module | None = None) -> nn.Module:  # fmt: skip
    jobs = plan_compensation(model, config, original)
    if not config.whiten:  # plain SVD of each residual: no statistics needed
        for name, job in jobs.items():
            _compensate(model, name, job, None, config)
        return model
    calib = check_calib(calib, "eora", purpose="to whiten the residual (or set whiten: false)")

    def fix(name: str, stats: LinearStats) -> None:
        _compensate(model, name, jobs[name], stats.H, config)

    calibrate_linears(model, calib, jobs, fix, spec=StatsSpec(hessian=True), batch_size=config.batch_size,
                      desc="EoRA")  # fmt: skip
    return model
