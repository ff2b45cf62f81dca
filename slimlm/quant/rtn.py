"""Round-to-nearest (RTN) weight quantization: the baseline every method is measured against.

Each selected linear's weight is quantized on its own with a scheme from
slimlm.formats and the linear is swapped for a QuantLinear.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from slimlm.errors import SlimlmError
from slimlm.formats import IntScheme, PerGroup, Scheme, check_group_size, parse_scheme
from slimlm.targets import Targets, match_override, replace_module, select_linears


@dataclass(frozen=True)
class RTN:
    """Quantize weights to ``scheme`` by plain rounding.

    ``overrides`` is a tuple of (glob, scheme): the first glob matching a
    module's full name picks its scheme (e.g. 8-bit for down_proj).
    """

    scheme: Scheme = IntScheme(bits=4, granularity=PerGroup(64))
    targets: Targets = field(default_factory=Targets)
    overrides: tuple[tuple[str, Scheme], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", parse_scheme(self.scheme))
        object.__setattr__(self, "overrides", tuple((str(p), parse_scheme(s)) for p, s in self.overrides))
        if not isinstance(self.targets, Targets):
            raise SlimlmError(f"targets must be a Targets(...), got {self.targets!r}")

    def scheme_for(self, name: str) -> Scheme:
        return match_override(name, self.overrides) or self.scheme


def in_features_of(module: nn.Module) -> int:
    """Input size of an nn.Linear or a transformers Conv1D (weight (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.weight.shape[0]


def check_schemes(plan: dict[str, tuple[nn.Module, Scheme]]) -> None:
    """Refuse the whole plan before touching anything: a group size that does not fit,
    or a weight holding NaN or Inf (rounding would spread it through its group)."""
    from slimlm.prune.compose import check_pruned

    plan = check_pruned(plan)  # pruned layers (SparseLinear, no .weight) are checked there, the others here
    for name, (module, scheme) in plan.items():
        # A lazily loaded block's weight is still on disk (meta); it is checked when read (slimlm.models.lazy).
        if not module.weight.is_meta and not torch.isfinite(module.weight).all():
            bad = int((~torch.isfinite(module.weight)).sum())
            raise SlimlmError(f"{name} holds {bad} NaN/Inf weight(s); fix or reload the model before quantizing")
        gran = getattr(scheme, "granularity", None)
        if isinstance(gran, PerGroup):
            try:
                check_group_size(in_features_of(module), gran.size)
            except SlimlmError as e:
                raise SlimlmError(f"{name}: {e}") from None


def apply_rtn(model: nn.Module, config: RTN, calib=None) -> nn.Module:
    from slimlm.nn import QuantLinear, SparseLinear
    from slimlm.prune.compose import rtn_pruned

    plan = {name: (m, config.scheme_for(name)) for name, m in select_linears(model, config.targets).items()}
    check_schemes(plan)
    for name, (module, scheme) in tqdm(plan.items(), desc="RTN", unit="linear", leave=False):
        if isinstance(module, SparseLinear):  # pruned earlier: keep its mask, round the survivors
            replace_module(model, name, rtn_pruned(module, scheme))
            continue
        replace_module(model, name, QuantLinear.from_linear(module, scheme))
    return model
