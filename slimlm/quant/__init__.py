"""Quantization methods: configs and their handlers."""

from slimlm.quant.rtn import RTN, apply_rtn

__all__ = ["RTN", "apply_rtn"]
