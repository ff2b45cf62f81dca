"""Low-rank methods: factorization of weights and compensation of quantization error."""

from slimlm.lowrank.compensate import compensation, output_error
from slimlm.lowrank.compensate_handler import EoRA, apply_eora

__all__ = ["EoRA", "apply_eora", "compensation", "output_error"]
