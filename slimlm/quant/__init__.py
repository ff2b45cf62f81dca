"""Quantization methods: configs and their handlers."""

from slimlm.quant.gptq import gptq_quantize
from slimlm.quant.gptq_handler import GPTQ, apply_gptq
from slimlm.quant.rtn import RTN, apply_rtn

__all__ = ["GPTQ", "RTN", "apply_gptq", "apply_rtn", "gptq_quantize"]
