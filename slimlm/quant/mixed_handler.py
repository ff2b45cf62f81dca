"""MixedPrecision config and handler: measure sensitivities, allocate bits, quantize by RTN.

The algorithm (sensitivity and the knapsack) is in :mod:`slimlm.quant.mixed`.
Statistics come block by block from the float model (nothing is rewritten
while they are gathered); then each linear becomes a QuantLinear at its scheme.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from slimlm.calib import StatsSpec, calibrate_blocks
from slimlm.errors import SlimlmError
from slimlm.formats import Scheme, bits_per_weight, parse_scheme
from slimlm.quant.mixed import allocate, average_bpw, min_bpw, sensitivities
from slimlm.quant.rtn import check_schemes
from slimlm.targets import Targets, replace_module, select_linears

log = logging.getLogger("slimlm.quant")


@dataclass(frozen=True)
class MixedPrecision:
    """One scheme per linear from ``candidates``, minimising the summed Hessian-weighted
    output error subject to an average of at most ``budget_bpw`` stored bits per weight.

    ``normalize`` (default) divides each layer's errors by its output energy
    ``tr(W H W^T)`` (sum of relative errors instead of absolute ones); on
    SmolLM2-135M it was clearly better than raw errors (benchmarks/mixed_qat.py).
    """

    needs_calibration: ClassVar[bool] = True

    budget_bpw: float = 3.5
    candidates: tuple[Scheme, ...] = ("int2-g64", "int3-g64", "int4-g64", "int8-channel-sym")
    targets: Targets = field(default_factory=Targets)
    batch_size: int = 8
    normalize: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.budget_bpw, bool) or not isinstance(self.budget_bpw, (int, float)) or self.budget_bpw <= 0:
            raise SlimlmError(f"budget_bpw must be a positive number of bits per weight (e.g. 3.5), "
                              f"got {self.budget_bpw!r}")  # fmt: skip
        if isinstance(self.candidates, (str, dict)) or len(self.candidates) < 1:
            raise SlimlmError(f"candidates must be a list of schemes such as ['int3-g64', 'int4-g64'], "
                              f"got {self.candidates!r}")  # fmt: skip
        object.__setattr__(self, "candidates", tuple(dict.fromkeys(parse_scheme(s) for s in self.candidates)))
        if not isinstance(self.targets, Targets):
            raise SlimlmError(f"targets must be a Targets(...), got {self.targets!r}")
        if self.targets.lm_head:
            raise SlimlmError("MixedPrecision allocates bits among decoder-block linears only; "
                              "quantize lm_head in a separate RTN step")  # fmt: skip
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise SlimlmError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if not isinstance(self.normalize, bool):
            raise SlimlmError(f"normalize must be true or false, got {self.normalize!r}")


@dataclass(frozen=True)
class Allocation:
    schemes: dict[str, Scheme]  # full linear name -> chosen scheme
    bits_per_weight: float  # average stored bits per weight, weighted by layer size
    total_error: float  # summed (normalised) sensitivity of the choice
    errors: dict[str, Tensor]  # full linear name -> (K,) sensitivity per candidate


def _weight(module: nn.Module) -> Tensor:
    from slimlm.nn import linear_weight

    return linear_weight(module)[0]  # (out, in)


def measure_sensitivities(model: nn.Module, config: MixedPrecision, calib: Tensor,
                          linears: dict[str, nn.Module]) -> dict[str, Tensor]:  # fmt: skip
    """Full name -> (K,) sensitivity per candidate, from the float model's block inputs."""
    errors: dict[str, Tensor] = {}

    def on_block(ctx) -> bool:
        for name in ctx.linears:
            if name in linears:
                W, H = _weight(linears[name]), ctx.stats[name].H
                errors[name] = sensitivities(W, H, config.candidates, normalize=config.normalize)
        return False  # nothing rewritten: later blocks see float inputs

    calibrate_blocks(model, calib, on_block=on_block, spec=StatsSpec(hessian=True),
                     batch_size=config.batch_size, desc="mixed: sensitivity")  # fmt: skip
    return errors


@torch.no_grad()
def mixed_allocation(model: nn.Module, config: MixedPrecision, calib: Tensor | None) -> Allocation:
    """Measure and allocate without changing the model."""
    if calib is None:
        raise SlimlmError("MixedPrecision needs calibration token ids: pass calib=calibration_batch(...) "
                          "(or run it from a recipe, which builds them)")  # fmt: skip
    linears = select_linears(model, config.targets)
    for scheme in config.candidates:
        check_schemes({name: (m, scheme) for name, m in linears.items()})
    errors = measure_sensitivities(model, config, calib, linears)
    names = list(linears)
    shapes = [tuple(_weight(linears[n]).shape) for n in names]
    err = torch.stack([errors[n] for n in names])  # (L, K)
    bpw = torch.tensor([[bits_per_weight(s, shp) for s in config.candidates] for shp in shapes], dtype=torch.float64)
    n_weights = torch.tensor([shp[0] * shp[1] for shp in shapes], dtype=torch.float64)
    if config.budget_bpw < min_bpw(bpw, n_weights) - 1e-12:
        raise SlimlmError(f"budget_bpw {config.budget_bpw} is below {min_bpw(bpw, n_weights):.4f}, the cheapest "
                          f"allocation of these candidates on this model; raise it or add a cheaper scheme")
    choice = allocate(err, bpw, n_weights, config.budget_bpw)
    schemes = {n: config.candidates[int(c)] for n, c in zip(names, choice)}
    return Allocation(schemes, average_bpw(choice, bpw, n_weights), float(err.gather(1, choice[:, None]).sum()),
                      errors)  # fmt: skip


def _bits(scheme: Scheme) -> str:
    return str(getattr(scheme, "bits", type(scheme).__name__))


def summarize(alloc: Allocation) -> dict[str, dict[str, str]]:
    """Layer type -> depth -> bits chosen, e.g. {"mlp.down_proj": {"0": "8", "1": "4"}}."""
    table: dict[str, dict[str, str]] = defaultdict(dict)
    for name, scheme in alloc.schemes.items():
        m = re.search(r"\.(\d+)\.(.+)$", name)
        depth, kind = (m.group(1), m.group(2)) if m else ("-", name)
        table[kind][depth] = _bits(scheme)
    return dict(table)


def log_allocation(alloc: Allocation) -> None:
    log.info("mixed precision: %.4f bpw, total error %.4g", alloc.bits_per_weight, alloc.total_error)
    for kind, by_depth in summarize(alloc).items():
        log.info("  %-20s bits by depth: %s", kind, " ".join(by_depth.values()))


def apply_mixed(model: nn.Module, config: MixedPrecision, calib: Tensor | None = None) -> nn.Module:
    from slimlm.nn import QuantLinear

    alloc = mixed_allocation(model, config, calib)
    log_allocation(alloc)
    linears = select_linears(model, config.targets)
    for name, scheme in tqdm(alloc.schemes.items(), desc="mixed: quantize", unit="linear", leave=False):
        replace_module(model, name, QuantLinear.from_linear(linears[name], scheme))
    return model
