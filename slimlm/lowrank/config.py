"""Configs of low-rank factorization: one per method, sharing how the rank of each layer is chosen.

Budget, exactly one of:

* ``params: p`` (the default, 0.2): remove the fraction ``p`` of the target
  linears' parameters. ``allocation: uniform`` gives every target the same
  kept fraction, ``rank = floor((1 - p) * m * n / (m + n))`` for an
  ``m x n`` weight; ``allocation: spectrum`` spends the one budget across all
  targets by their (whitened) spectra (:func:`slimlm.lowrank.ranks.spectrum_ranks`).
* ``energy: e``: per layer, the smallest rank whose truncation keeps at least
  the fraction ``e`` of the whitened energy (drops at most ``1 - e``).
* ``rank: r``: the same rank for every target.

A layer whose chosen rank would hold at least as many weights as the dense
matrix (``r >= m n / (m + n)``) is left dense (energy and spectrum modes) --
except with an explicit ``rank``, which is always honoured (with a warning).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slimlm.errors import SlimlmError
from slimlm.targets import Targets, check_targets
from slimlm.validate import check_bool, check_pos_int

ALLOCATIONS = ("uniform", "spectrum")
DEFAULT_PARAMS = 0.2


def _fraction(name: str, value: object, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise SlimlmError(f"{name} must be a number strictly between 0 and 1 ({hint}), got {value!r}")


@dataclass(frozen=True)
class LowRank:
    """What every low-rank method shares (not a method itself: use SVD, ASVD or SVDLLM)."""

    params: float | None = None
    energy: float | None = None
    rank: int | None = None
    allocation: str = "uniform"
    targets: Targets = field(default_factory=Targets)

    def __post_init__(self) -> None:
        given = [k for k in ("params", "energy", "rank") if getattr(self, k) is not None]
        if len(given) > 1:
            raise SlimlmError(f"give one budget of params, energy or rank, not {' and '.join(given)}")
        if not given:
            object.__setattr__(self, "params", DEFAULT_PARAMS)
        if self.params is not None:
            _fraction("params", self.params, "the fraction of the target linears' parameters removed, e.g. 0.2; "
                      "1 would remove everything")  # fmt: skip
        if self.energy is not None:
            _fraction("energy", self.energy, "the fraction of each layer's whitened energy kept, e.g. 0.95")
        if self.rank is not None:
            check_pos_int("rank", self.rank, "singular directions kept per layer, at most min(in, out)")
        if self.allocation not in ALLOCATIONS:
            raise SlimlmError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.allocation == "spectrum" and self.params is None:
            raise SlimlmError("allocation: spectrum spends a params budget; give params (e.g. 0.2) or use "
                              "allocation: uniform with energy/rank")  # fmt: skip
        check_targets(self.targets)


@dataclass(frozen=True)
class SVD(LowRank):
    """Plain truncated SVD of each weight (minimises ``||W - W'||_F``; no calibration)."""


@dataclass(frozen=True)
class ASVD(LowRank):
    """ASVD (Yuan et al. 2023): input channels scaled by activation magnitude ** ``alpha`` before the SVD."""

    alpha: float = 0.5
    batch_size: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 < self.alpha <= 2.0:
            raise SlimlmError(f"alpha must be a number in (0, 2] (the paper uses 0.5), got {self.alpha!r}")
        check_pos_int("batch_size", self.batch_size, "calibration sequences per forward, e.g. 8")


@dataclass(frozen=True)
class SVDLLM(LowRank):
    """SVD-LLM (Wang et al. 2024): SVD whitened by the Cholesky factor of the inputs' Gram matrix.

    ``damp``: added to the Gram matrix's diagonal as a fraction of its mean
    (raised tenfold, logged, if the matrix still does not factor).
    ``update``: after truncation, refit the output factor ``B`` by least squares
    on the (undampened) calibration Gram matrix, ``A`` fixed
    (:func:`slimlm.lowrank.svd_llm.closed_form_update`)."""

    damp: float = 0.01
    batch_size: int = 8
    update: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0.0 <= self.damp <= 1.0:
            raise SlimlmError(f"damp must be a number in [0, 1] (a fraction of the Gram matrix's mean diagonal, "
                              f"e.g. 0.01), got {self.damp!r}")  # fmt: skip
        check_pos_int("batch_size", self.batch_size, "calibration sequences per forward, e.g. 8")
        check_bool("update", self.update)
