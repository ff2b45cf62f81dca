"""Structured pruning configs: ``PruneWidth``, ``PruneDepth``, ``Structured``, validated on construction.

An amount is an int count or a float fraction in [0, 1) of the units it
removes (heads, KV groups, neurons, layers). ``width_counts`` turns a
``PruneWidth`` into per-layer counts once the model's shape is known, and
refuses what the shape cannot take.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slimlm.errors import SlimlmError
from slimlm.targets import Targets
from slimlm.validate import check_pos_int

METRICS = ("block_importance", "perplexity")
MODES = ("width", "depth")
# How Structured(mode="width") splits a budget between attention and MLP (see structured_search.width_plan).
ATTENTION_STEPS = ("search", "groups", "heads", "none")


def _check_amount(name: str, value: object, of: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SlimlmError(f"{name} must be a count (int >= 0) or a fraction in [0, 1) of {of}, got {value!r}")
    if isinstance(value, float) and not 0.0 <= value < 1.0:
        raise SlimlmError(f"{name}={value} is a fraction outside [0, 1) of {of}; give a fraction in [0, 1) "
                          "or an int count")  # fmt: skip
    if isinstance(value, int) and value < 0:
        raise SlimlmError(f"{name}={value} must be >= 0 (a count) or a fraction in [0, 1) of {of}")


def count(value: int | float, total: int) -> int:
    """An amount as a count of ``total`` units: an int as it is, a fraction rounded."""
    return value if isinstance(value, int) else round(value * total)


def _check_common(cfg) -> None:
    if cfg.targets != Targets():
        raise SlimlmError(f"{type(cfg).__name__} prunes every decoder block alike (uniform widths); "
                          "include/exclude/lm_head are not supported")  # fmt: skip
    check_pos_int("batch_size", cfg.batch_size, "calibration sequences per forward")


def _check_depth_fields(cfg) -> None:
    if cfg.metric not in METRICS:
        raise SlimlmError(f"metric {cfg.metric!r} is unknown; valid: {', '.join(METRICS)}")
    check_pos_int("ppl_samples", cfg.ppl_samples, "calibration sequences scored per dropped layer")


@dataclass(frozen=True)
class PruneWidth:
    """Remove attention heads and MLP neurons, the same number in every layer (Minitron importance).

    Each amount is an int count per layer or a float fraction in [0, 1) of
    the layer's units. ``heads``: query heads, spread evenly over the KV
    groups (each group keeps the same number); ``groups``: whole KV groups,
    each a KV head with all its query heads; give one or the other.
    ``neurons``: MLP intermediate channels.
    """

    heads: int | float = 0
    groups: int | float = 0
    neurons: int | float = 0
    batch_size: int = 8
    targets: Targets = field(default_factory=Targets)

    def __post_init__(self) -> None:
        _check_amount("heads", self.heads, "the query heads")
        _check_amount("groups", self.groups, "the KV groups")
        _check_amount("neurons", self.neurons, "the MLP neurons")
        if self.heads and self.groups:
            raise SlimlmError("give heads (query heads spread over the KV groups) or groups (whole KV groups), not both")
        _check_common(self)


@dataclass(frozen=True)
class PruneDepth:
    """Remove ``layers`` whole decoder layers (an int count or a fraction in [0, 1) of them).

    ``metric``: ``block_importance`` (ShortGPT, 1 - cos(input, output) per
    block, one calibration pass) or ``perplexity`` (calibration loss with the
    layer skipped, on the first ``ppl_samples`` sequences, one pass per
    layer). The layers with the lowest scores go.
    """

    layers: int | float = 0
    metric: str = "block_importance"
    ppl_samples: int = 8
    batch_size: int = 8
    targets: Targets = field(default_factory=Targets)

    def __post_init__(self) -> None:
        _check_amount("layers", self.layers, "the decoder layers")
        _check_depth_fields(self)
        _check_common(self)


@dataclass(frozen=True)
class Structured:
    """Remove about ``params`` (a fraction in [0, 1)) of the model's TOTAL parameters.

    The total counts every parameter once, so a tied embedding / lm_head
    counts once; embeddings and norms are never removed, so the reachable
    fraction is below 1. ``mode="depth"``: the nearest whole number of
    layers (``metric``, ``ppl_samples`` as in PruneDepth). ``mode="width"``:
    attention in whole steps (KV groups, or query heads from every group),
    MLP neurons for the rest. ``attention`` picks the split:
    ``search`` (default) prunes a copy per candidate split on the first
    ``search_samples`` calibration sequences and keeps the one with the
    lowest calibration loss (one extra pruning pass per candidate);
    ``groups`` / ``heads``: the whole-group / heads-per-group step count
    nearest the budget's share of the block; ``none``: neurons only.
    """

    params: float = 0.25
    mode: str = "width"
    attention: str = "search"
    search_samples: int = 8
    metric: str = "block_importance"
    ppl_samples: int = 8
    batch_size: int = 8
    targets: Targets = field(default_factory=Targets)

    def __post_init__(self) -> None:
        p = self.params
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise SlimlmError(f"params must be a fraction in [0, 1) of the model's parameters, got {p!r}")
        if self.mode not in MODES:
            raise SlimlmError(f"mode {self.mode!r} is unknown; valid: {', '.join(MODES)}")
        if self.attention not in ATTENTION_STEPS:
            raise SlimlmError(f"attention {self.attention!r} is unknown; valid: {', '.join(ATTENTION_STEPS)}")
        check_pos_int("search_samples", self.search_samples, "calibration sequences per candidate split")
        _check_depth_fields(self)
        _check_common(self)


def width_counts(config: PruneWidth, n_heads: int, n_kv: int, n_neurons: int) -> tuple[int, int, int]:
    """-> (query heads removed per KV group, KV groups removed, neurons removed) per layer, or a refusal."""
    G = n_heads // n_kv
    heads, groups, neurons = count(config.heads, n_heads), count(config.groups, n_kv), count(config.neurons, n_neurons)
    if G == 1:  # one query head per group: removing a head removes its group
        per_group, groups = 0, max(heads, groups)
    elif isinstance(config.heads, float):
        per_group = round(config.heads * G)
    elif heads % n_kv:
        valid = ", ".join(str(k * n_kv) for k in range(G))
        raise SlimlmError(f"heads={heads} does not split evenly over the {n_kv} KV groups (each keeps the same "
                          f"number of query heads); valid: {valid}")  # fmt: skip
    else:
        per_group = heads // n_kv
    if per_group >= G:
        raise SlimlmError(f"heads={config.heads!r} removes {per_group} query heads from each KV group, but a group holds "
                          f"only {G}; remove at most {G - 1} per group, or whole groups with groups=N")  # fmt: skip
    if groups >= n_kv:
        raise SlimlmError(f"groups={config.groups!r} removes {groups} of the {n_kv} KV groups per layer; "
                          f"keep at least one (valid: 0..{n_kv - 1})")  # fmt: skip
    if neurons >= n_neurons:
        raise SlimlmError(f"neurons={config.neurons!r} removes {neurons} of the {n_neurons} MLP neurons per layer; "
                          f"keep at least one (valid: 0..{n_neurons - 1})")  # fmt: skip
    return per_group, groups, neurons
