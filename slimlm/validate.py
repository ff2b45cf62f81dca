"""Checks that configs and handlers share: each refusal is one line naming the value and the fix.

These sit at the bottom of the package (they import only ``errors`` and
torch), so every layer may use them. A method-specific check stays with its
method; a check written a second time moves here.
"""

from __future__ import annotations

from torch import Tensor

from slimlm.errors import SlimlmError


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise SlimlmError(f"{name} must be true or false, got {value!r}")


def check_pos_int(name: str, value: object, hint: str) -> None:
    """``value`` is an int >= 1 (a bool is not); ``hint`` says what it counts."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SlimlmError(f"{name} must be a positive int ({hint}), got {value!r}")


def check_min_int(name: str, value: object, low: int, hint: str) -> None:
    """``value`` is an int >= ``low`` (a bool is not); ``hint`` says what it counts."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SlimlmError(f"{name} must be an int >= {low} ({hint}), got {value!r}")


def check_percdamp(value: object) -> None:
    """OBS dampening (GPTQ, SparseGPT): a fraction of the Hessian's mean diagonal."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise SlimlmError(f"percdamp must be a number in [0, 1] (the paper uses 0.01), got {value!r}")


def check_calib(calib: object, method: str, *, purpose: str = "") -> Tensor:
    """``calib`` is a non-empty (N, L) tensor of token ids; ``purpose`` says what ``method`` uses it for."""
    if calib is None:
        why = f" {purpose}" if purpose else ""
        raise SlimlmError(f"{method} needs calibration token ids (N, L){why}; pass calib=calibration_ids(...) "
                          "or use a recipe through `slimlm compress`, which provides them")  # fmt: skip
    if not isinstance(calib, Tensor) or calib.dim() != 2 or calib.numel() == 0:
        raise SlimlmError(f"calib must be a non-empty (N, L) tensor of token ids, got {type(calib).__name__}")
    return calib
