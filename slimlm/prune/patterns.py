"""Sparsity patterns: which weights a pruned matrix may keep.

Typed values, not strings: ``Unstructured()`` (any weight may go) and
``NM(n, m)`` (in every run of ``m`` consecutive input columns of an output
row, exactly ``n`` weights are kept: ``NM(2, 4)`` is NVIDIA's 2:4, 50%
sparse). The YAML shorthand ``"2:4"`` / ``"unstructured"`` is parsed once, at
the boundary, by :func:`parse_pattern`.

Counting rule used everywhere: pruning a fraction ``s`` of ``n`` weights
removes ``floor(s * n + 1/2)`` of them (round half up), so the number of zeros
of a pruned matrix is exact and predictable.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from slimlm.errors import SlimlmError
from slimlm.formats.granularity import divisors

_NM = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")


@dataclass(frozen=True)
class Unstructured:
    """Any weight may be pruned; the fraction is the method's ``sparsity``."""

    def __str__(self) -> str:
        return "unstructured"


@dataclass(frozen=True)
class NM:
    """Keep ``n`` of every ``m`` consecutive input columns in each output row (sparsity ``1 - n/m``)."""

    n: int
    m: int

    def __post_init__(self) -> None:
        for name in ("n", "m"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SlimlmError(f"N:M pattern needs positive ints, got {name}={value!r} (e.g. NM(2, 4))")
        if self.n >= self.m:
            raise SlimlmError(f"N:M pattern {self.n}:{self.m} keeps everything: N (kept) must be < M, "
                              "e.g. 2:4 or 4:8")  # fmt: skip

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


Pattern = Unstructured | NM


def parse_pattern(obj: object) -> Pattern:
    """A pattern from ``"unstructured"``, ``"N:M"``, or a pattern (returned as is)."""
    if isinstance(obj, (Unstructured, NM)):
        return obj
    if isinstance(obj, str):
        if obj.strip().lower() == "unstructured":
            return Unstructured()
        if m := _NM.fullmatch(obj):
            return NM(int(m.group(1)), int(m.group(2)))
    if isinstance(obj, int) and not isinstance(obj, bool):  # YAML 1.1 reads unquoted 2:4 as base-60 124
        raise SlimlmError(f"pattern {obj!r} is a number: quote N:M patterns in YAML (pattern: \"2:4\"), "
                          "unquoted 2:4 is read as the base-60 number 124")  # fmt: skip
    raise SlimlmError(f"unknown sparsity pattern {obj!r}; valid: \"unstructured\" or \"N:M\" with N < M "
                      "(e.g. \"2:4\", \"4:8\")")  # fmt: skip


def check_sparsity(sparsity: object, *, name: str = "sparsity") -> float:
    """Refuse a sparsity outside [0, 1) (the fraction of weights removed)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise SlimlmError(f"{name} must be a number in [0, 1) (the fraction of weights removed, e.g. 0.5), "
                          f"got {sparsity!r}")  # fmt: skip
    return float(sparsity)


def resolve_sparsity(sparsity: float | None, pattern: Pattern) -> float:
    """The sparsity a config means: given (unstructured, default 0.5) or implied by N:M."""
    if isinstance(pattern, NM):
        if sparsity is not None and not math.isclose(check_sparsity(sparsity), pattern.sparsity):
            raise SlimlmError(f"sparsity {sparsity} contradicts pattern {pattern}, which removes "
                              f"{pattern.sparsity:g}; leave sparsity out for N:M patterns")  # fmt: skip
        return pattern.sparsity
    return check_sparsity(0.5 if sparsity is None else sparsity)


def check_fits(pattern: Pattern, in_features: int, *, name: str = "") -> None:
    """Refuse an N:M pattern whose M does not split a layer's input columns into whole groups."""
    if isinstance(pattern, NM) and in_features % pattern.m != 0:
        where = f"{name}: " if name else ""
        valid = ", ".join(str(d) for d in divisors(in_features) if d > 1)
        raise SlimlmError(f"{where}M={pattern.m} of pattern {pattern} does not divide in_features "
                          f"{in_features}; valid M: {valid}")  # fmt: skip


def n_pruned(count: int, sparsity: float) -> int:
    """How many of ``count`` weights a fraction ``sparsity`` removes (round half up)."""
    return int(math.floor(sparsity * count + 0.5))
