"""Granularity: which elements of a tensor share one scale (and zero).

Typed values, not strings: ``PerGroup(64)``, never ``"g64"``. Weights are
``(out_features, in_features)``; activations are ``(..., in_features)``.

=============  ==========================================  ==============
granularity    elements sharing one scale                  scale shape
=============  ==========================================  ==============
PerTensor()    the whole tensor                            (1, 1)
PerChannel()   one output row of W                         (out, 1)
PerGroup(G)    G consecutive input columns in one row      (out, in // G)
PerToken()     one row of X (activations)                  (..., 1)
=============  ==========================================  ==============

A weight scale of shape ``(R, g)`` always broadcasts over the view
``W.reshape(R, g, -1)`` as ``scale.unsqueeze(-1)``; see :func:`group_view`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from slimlm.errors import SlimlmError


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""


@dataclass(frozen=True)
class PerChannel:
    """One scale per output row of a weight ``(out, in)``."""


@dataclass(frozen=True)
class PerGroup:
    """One scale per ``size`` consecutive input columns within each row."""

    size: int

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise SlimlmError(f"PerGroup size must be a positive int (e.g. 32, 64, 128), got {self.size!r}")


@dataclass(frozen=True)
class PerToken:
    """One scale per row of an activation ``X (..., in)``: dynamic, per token."""


Granularity = PerTensor | PerChannel | PerGroup | PerToken
WEIGHT_GRANULARITIES = (PerTensor, PerChannel, PerGroup)


def divisors(n: int) -> list[int]:
    """All positive divisors of ``n``, ascending."""
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def check_group_size(in_features: int, size: int) -> None:
    """Refuse a group size that does not split ``in_features`` into whole groups.

    The message lists every valid size so the fix is one edit away.
    """
    if size < 1 or in_features % size != 0:
        valid = ", ".join(str(d) for d in divisors(in_features))
        raise SlimlmError(f"group_size {size} does not divide in_features {in_features}; valid: {valid}")


def num_groups(shape: tuple[int, ...], granularity: Granularity) -> tuple[int, int]:
    """The scale shape ``(R, g)`` of a 2-D weight of ``shape`` under ``granularity``."""
    out_features, in_features = shape
    if isinstance(granularity, PerTensor):
        return 1, 1
    if isinstance(granularity, (PerChannel, PerToken)):
        return out_features, 1
    if isinstance(granularity, PerGroup):
        check_group_size(in_features, granularity.size)
        return out_features, in_features // granularity.size
    raise SlimlmError(
        f"unknown granularity {granularity!r}; valid: PerTensor(), PerChannel(), PerGroup(size), PerToken()"
    )


def group_view(W: Tensor, granularity: Granularity) -> Tensor:
    """View a 2-D ``W (out, in)`` as ``(R, g, n)``: one scale per ``[r, j, :]``."""
    if W.dim() != 2:
        raise SlimlmError(f"weights must be 2-D (out_features, in_features), got shape {tuple(W.shape)}")
    R, g = num_groups(tuple(W.shape), granularity)
    return W.reshape(R, g, -1)  # (R, g, n) with R * g * n == out * in
