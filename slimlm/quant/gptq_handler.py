"""GPTQ config and handler: gather each block's Hessians, quantize its linears, swap in QuantLinear.

The algorithm is :func:`slimlm.quant.gptq.gptq_quantize`. By default
("true sequential", as AutoGPTQ and GPTQModel default to) each group of a
block's linears is quantized from the Hessian of its inputs with the groups
before it already quantized (q/k/v, then o_proj, gate/up, down_proj), in
one forward per block (:mod:`slimlm.calib.sequential`); the forwards'
outputs are block ``i+1``'s calibration inputs. ``true_sequential: false``
walks as the paper's code does without that flag: every linear of a block
from the inputs its float block gives, then the block is re-run (two
forwards per block, less memory: the suspended forwards of the one-pass
walk hold their activations at once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from slimlm.calib.runner import calibrate_linears
from slimlm.calib.stats import LinearStats, StatsSpec
from slimlm.errors import SlimlmError
from slimlm.formats import IntScheme, PerGroup, Scheme, parse_scheme
from slimlm.nn import QuantLinear, SparseLinear, check_schemes, gptq_pruned, linear_weight, share_embedding
from slimlm.quant.gptq import check_gptq_scheme, gptq_quantize
from slimlm.targets import Targets, check_targets, match_override, replace_module, scheme_plan, shared_head
from slimlm.validate import check_bool, check_calib, check_percdamp, check_pos_int

log = logging.getLogger("slimlm.quant")

# calib_dtype -> the autocast dtype of the calibration forwards (None: the model's own, float32)
CALIB_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class GPTQ:
    """Quantize weights to ``scheme`` (IntScheme or TernaryScheme) with GPTQ.

    ``act_order`` solves columns by decreasing input energy; ``static_groups``
    fixes group parameters from the float weights first (groups stay
    contiguous either way). ``percdamp`` is the dampening as a fraction of
    the mean Hessian diagonal; ``blocksize`` the lazy-update width;
    ``batch_size`` the calibration mini-batch. ``calib_dtype="bfloat16"``
    runs the calibration forwards' matmuls and attention in bfloat16
    (autocast; Hessians, solves and the residual stream stay float32):
    several times faster on CPUs with bf16 matmuls, not exact (the Hessians
    and so the codes change a little). ``overrides`` and a scheme
    for ``targets.lm_head`` as in RTN (GPTQ solves the head too, from one
    more forward of the whole quantized model: refused under ``--lazy``).
    """

    scheme: Scheme = IntScheme(bits=4, granularity=PerGroup(64))
    targets: Targets = field(default_factory=Targets)
    overrides: tuple[tuple[str, Scheme], ...] = ()
    act_order: bool = True
    static_groups: bool = True
    percdamp: float = 0.01
    blocksize: int = 128
    batch_size: int = 8
    calib_dtype: str = "float32"
    true_sequential: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", parse_scheme(self.scheme))
        object.__setattr__(self, "overrides", tuple((str(p), parse_scheme(s)) for p, s in self.overrides))
        check_targets(self.targets, head_scheme=True)
        for s in (self.scheme, *(s for _, s in self.overrides), self.targets.head_scheme):
            if s is not None:
                check_gptq_scheme(s)
        check_bool("act_order", self.act_order)
        check_bool("static_groups", self.static_groups)
        check_bool("true_sequential", self.true_sequential)
        check_percdamp(self.percdamp)
        check_pos_int("blocksize", self.blocksize, "lazy-update width, e.g. 128")
        check_pos_int("batch_size", self.batch_size, "calibration sequences per forward, e.g. 8")
        if self.calib_dtype not in CALIB_DTYPES:
            raise SlimlmError(f"calib_dtype must be one of {', '.join(CALIB_DTYPES)}, got {self.calib_dtype!r}")

    def scheme_for(self, name: str) -> Scheme:
        return match_override(name, self.overrides) or self.scheme


def _quantize_into(model: nn.Module, name: str, module: nn.Module, scheme: Scheme, H: Tensor, config: GPTQ) -> None:
    if isinstance(module, SparseLinear):  # pruned earlier: GPTQ's updates would fill its zeros; keep the mask
        new = gptq_pruned(module, H, scheme, blocksize=config.blocksize, percdamp=config.percdamp,
                          act_order=config.act_order, static_groups=config.static_groups)  # fmt: skip
        replace_module(model, name, new)
        return
    W, _ = linear_weight(module)  # (out, in), also for GPT-2's Conv1D (stored (in, out))
    qweight, stats = gptq_quantize(W, H.to(W.device), scheme, blocksize=config.blocksize, percdamp=config.percdamp,
                                   act_order=config.act_order, static_groups=config.static_groups)  # fmt: skip
    log.debug("gptq %s: loss %.4g, damp %.3g, %d dead inputs, %.2fs", name, stats["loss"], stats["damp"],
              stats["dead"], stats["seconds"])  # fmt: skip
    replace_module(model, name, QuantLinear.from_linear(module, scheme, qweight=qweight))


def apply_gptq(model: nn.Module, config: GPTQ, calib: Tensor | None = None) -> nn.Module:
    calib = check_calib(calib, "GPTQ")
    plan = scheme_plan(model, config.targets, config.scheme_for)
    check_schemes(plan)
    shared = shared_head(model, config.targets, plan)

    def quantize(name: str, stats: LinearStats) -> None:
        module, scheme = plan[name]
        _quantize_into(model, name, module, scheme, stats.H, config)

    calibrate_linears(model, calib, plan, quantize, spec=StatsSpec(hessian=True), batch_size=config.batch_size,
                      desc="GPTQ", autocast=CALIB_DTYPES[config.calib_dtype],
                      sequential=config.true_sequential)  # fmt: skip
    if shared is not None:
        share_embedding(model, *shared)
    return model
