"""Round-to-nearest (RTN) weight quantization: the baseline every method is measured against.

Each selected linear's weight is quantized on its own with a scheme from
slimlm.formats and the linear is swapped for a QuantLinear (a pruned layer
keeps its mask: :func:`slimlm.nn.rtn_pruned`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from tqdm.auto import tqdm

from slimlm.formats import IntScheme, PerGroup, Scheme, parse_scheme
from slimlm.nn import QuantLinear, SparseLinear, check_schemes, rtn_pruned, share_embedding
from slimlm.targets import Targets, check_targets, match_override, replace_module, scheme_plan, shared_head

__all__ = ["RTN", "apply_rtn"]


@dataclass(frozen=True)
class RTN:
    """Quantize weights to ``scheme`` by plain rounding.

    ``overrides`` is a tuple of (glob, scheme): the first glob matching a
    module's full name picks its scheme (e.g. 8-bit for down_proj).
    ``targets.lm_head`` may name the output projection's own scheme
    (``Targets(lm_head="int8-channel-sym")``), which wins over overrides.
    """

    scheme: Scheme = IntScheme(bits=4, granularity=PerGroup(64))
    targets: Targets = field(default_factory=Targets)
    overrides: tuple[tuple[str, Scheme], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", parse_scheme(self.scheme))
        object.__setattr__(self, "overrides", tuple((str(p), parse_scheme(s)) for p, s in self.overrides))
        check_targets(self.targets, head_scheme=True)

    def scheme_for(self, name: str) -> Scheme:
        return match_override(name, self.overrides) or self.scheme


def apply_rtn(model: nn.Module, config: RTN, calib=None) -> nn.Module:
    plan = scheme_plan(model, config.targets, config.scheme_for)
    check_schemes(plan)
    shared = shared_head(model, config.targets, plan)
    for name, (module, scheme) in tqdm(plan.items(), desc="RTN", unit="linear", leave=False):
        if isinstance(module, SparseLinear):  # pruned earlier: keep its mask, round the survivors
            replace_module(model, name, rtn_pruned(module, scheme))
            continue
        replace_module(model, name, QuantLinear.from_linear(module, scheme))
    if shared is not None:
        share_embedding(model, *shared)
    return model
