"""MixedPrecision config and handler: measure sensitivities, allocate bits, quantize by RTN or GPTQ.

The algorithm (sensitivity and the knapsack) is in :mod:`slimlm.quant.mixed`.
Statistics come block by block from the float model (nothing is rewritten
while they are gathered); then each linear becomes a QuantLinear at its scheme.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from slimlm.calib.runner import calibrate_blocks
from slimlm.calib.stats import StatsSpec
from slimlm.errors import SlimlmError
from slimlm.formats import Scheme, bits_per_weight, parse_scheme
from slimlm.nn import QuantLinear, check_schemes, linear_weight
from slimlm.quant.gptq import check_gptq_scheme
from slimlm.quant.gptq_handler import GPTQ, apply_gptq
from slimlm.quant.mixed import allocate, average_bpw, fits, min_bpw, sensitivities
from slimlm.targets import Targets, check_targets, replace_module, select_linears
from slimlm.validate import check_bool, check_calib, check_min_int, check_pos_int

log = logging.getLogger("slimlm.quant")


# 3 and 4 bits at several group sizes (cheaper scales let more layers afford 4 bits) and int8;
# no 2-bit: one 2-bit layer costs more than the bits it frees buy back elsewhere.
DEFAULT_CANDIDATES = ("int3-channel", "int3-g192", "int3-g128", "int3-g96", "int3-g64", "int4-channel", "int4-g192",
                      "int4-g128", "int4-g96", "int4-g64", "int8-channel-sym")  # fmt: skip
SENSITIVITIES = ("fisher", "hessian")
QUANTIZERS = ("rtn", "gptq")


@dataclass(frozen=True)
class MixedPrecision:
    """One scheme per linear from ``candidates``, minimising the summed Hessian-weighted
    output error subject to an average of at most ``budget_bpw`` stored bits per weight.

    ``sensitivity`` is ``"fisher"`` (default: the Fisher-weighted error, an
    estimate of each choice's increase of the model's loss, from gradients on
    ``fisher_samples`` calibration sequences) or ``"hessian"`` (each layer's own
    output error; ``normalize`` then divides it by the layer's output energy
    ``tr(W H W^T)``). On SmolLM2-135M the layer-local Hessian errors let the
    allocation pick 2-bit layers that wrecked the model; see benchmarks/RESULTS.md.
    A candidate whose group size does not divide a layer's inputs is skipped for
    that layer (e.g. ``int3-g192`` fits 576 and 1536 inputs, not 4096).
    ``quantizer`` is ``"rtn"`` (round each layer at its scheme) or ``"gptq"``
    (then one GPTQ walk solves each layer at its scheme; the allocation still
    comes from the rounding errors, so it is conservative for GPTQ).
    """

    budget_bpw: float = 3.5
    candidates: tuple[Scheme, ...] = DEFAULT_CANDIDATES
    targets: Targets = field(default_factory=Targets)
    batch_size: int = 8
    normalize: bool = True
    sensitivity: str = "fisher"
    fisher_samples: int = 32
    quantizer: str = "rtn"  # "gptq": each linear solved by GPTQ (act-order) at its allocated scheme

    def __post_init__(self) -> None:
        if isinstance(self.budget_bpw, bool) or not isinstance(self.budget_bpw, (int, float)) or self.budget_bpw <= 0:
            raise SlimlmError(f"budget_bpw must be a positive number of bits per weight (e.g. 3.5), "
                              f"got {self.budget_bpw!r}")  # fmt: skip
        if isinstance(self.candidates, (str, dict)) or len(self.candidates) < 1:
            raise SlimlmError(f"candidates must be a list of schemes such as ['int3-g64', 'int4-g64'], "
                              f"got {self.candidates!r}")  # fmt: skip
        object.__setattr__(self, "candidates", tuple(dict.fromkeys(parse_scheme(s) for s in self.candidates)))
        check_targets(self.targets)
        if self.targets.head:
            raise SlimlmError("MixedPrecision allocates bits among decoder-block linears only; "
                              "quantize lm_head in a separate RTN step")  # fmt: skip
        check_pos_int("batch_size", self.batch_size, "calibration sequences per forward, e.g. 8")
        check_bool("normalize", self.normalize)
        if self.sensitivity not in SENSITIVITIES:
            raise SlimlmError(f"sensitivity must be one of {', '.join(SENSITIVITIES)}, got {self.sensitivity!r}")
        check_min_int("fisher_samples", self.fisher_samples, 1, "calibration sequences with a backward pass")
        if self.quantizer not in QUANTIZERS:
            raise SlimlmError(f"quantizer must be one of {', '.join(QUANTIZERS)}, got {self.quantizer!r}")
        if self.quantizer == "gptq":
            for scheme in self.candidates:
                check_gptq_scheme(scheme)

    def gptq_config(self, schemes: dict[str, Scheme]):
        """The GPTQ step that quantizes each linear at its allocated scheme (``quantizer: gptq``)."""
        first = next(iter(schemes.values()), self.candidates[0])
        return GPTQ(scheme=first, targets=self.targets, overrides=tuple(schemes.items()),
                    batch_size=self.batch_size)  # fmt: skip


@dataclass(frozen=True)
class Allocation:
    schemes: dict[str, Scheme]  # full linear name -> chosen scheme
    bits_per_weight: float  # average stored bits per weight, weighted by layer size
    total_error: float  # summed (normalised) sensitivity of the choice
    errors: dict[str, Tensor]  # full linear name -> (K,) sensitivity per candidate


def _weight(module: nn.Module) -> Tensor:
    return linear_weight(module)[0]  # (out, in)


def fisher_diagonal(model: nn.Module, calib: Tensor, linears: dict[str, nn.Module]) -> dict[str, Tensor]:
    """Full name -> ``(out, in)`` sum over the sequences of ``calib`` of the squared gradient of the LM loss.

    One backward pass per sequence (the empirical Fisher squares per-sample
    gradients, not a batch's summed gradient). Only the targets' weights
    require gradients; everything is restored afterwards.
    """
    weights = {name: lin.weight for name, lin in linears.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    F = {name: torch.zeros_like(_weight(lin), dtype=torch.float32) for name, lin in linears.items()}
    conv1d = {name for name, w in weights.items() if tuple(w.shape) != tuple(F[name].shape)}  # GPT-2 Conv1D (in, out)
    device = next(iter(weights.values())).device
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            for ids in tqdm(calib, desc="mixed: fisher", unit="seq", leave=False):
                ids = ids[None].to(device)  # (1, L)
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
                for name, w in weights.items():
                    g = w.grad.float()
                    F[name] += (g.t() if name in conv1d else g).square()
                    w.grad = None
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    return F


def measure_sensitivities(model: nn.Module, config: MixedPrecision, calib: Tensor,
                          linears: dict[str, nn.Module]) -> dict[str, Tensor]:  # fmt: skip
    """Full name -> (K,) sensitivity per candidate."""
    if config.sensitivity == "fisher":
        F = fisher_diagonal(model, calib[: config.fisher_samples], linears)
        return {name: sensitivities(_weight(lin), None, config.candidates, fisher=F.pop(name))
                for name, lin in tqdm(linears.items(), desc="mixed: errors", unit="linear", leave=False)}  # fmt: skip
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
    calib = check_calib(calib, "MixedPrecision")
    linears = select_linears(model, config.targets)
    shapes = {name: tuple(_weight(m).shape) for name, m in linears.items()}
    for scheme in config.candidates:
        check_schemes({name: (m, scheme) for name, m in linears.items() if fits(scheme, shapes[name])})
    for name, shp in shapes.items():
        if not any(fits(s, shp) for s in config.candidates):
            check_schemes({name: (linears[name], config.candidates[0])})  # names the valid group sizes
    errors = measure_sensitivities(model, config, calib, linears)
    names = list(linears)
    err = torch.stack([errors[n] for n in names])  # (L, K), inf where a candidate does not fit
    bpw = torch.tensor([[bits_per_weight(s, shapes[n]) if fits(s, shapes[n]) else float("inf")
                         for s in config.candidates] for n in names], dtype=torch.float64)  # fmt: skip
    n_weights = torch.tensor([shapes[n][0] * shapes[n][1] for n in names], dtype=torch.float64)
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
    alloc = mixed_allocation(model, config, calib)
    log_allocation(alloc)
    if config.quantizer == "gptq":
        return apply_gptq(model, config.gptq_config(alloc.schemes), calib)
    linears = select_linears(model, config.targets)
    for name, scheme in tqdm(alloc.schemes.items(), desc="mixed: quantize", unit="linear", leave=False):
        replace_module(model, name, QuantLinear.from_linear(linears[name], scheme))
    return model
