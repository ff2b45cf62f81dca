"""Measurement on a locked protocol: quality, size and speed."""

from slimlm.eval.protocol import PROTOCOLS, Protocol, get_protocol
from slimlm.eval.quality import BaseStats, Quality, kl_to_base, score_windows
from slimlm.eval.result import Result, format_results, load_result
from slimlm.eval.runner import evaluate
from slimlm.models.size import SizeReport, measure_size
from slimlm.eval.speed import Speed, measure_speed

__all__ = [
    "PROTOCOLS", "Protocol", "get_protocol", "BaseStats", "Quality", "kl_to_base", "score_windows",
    "Result", "format_results", "load_result", "evaluate", "SizeReport", "measure_size", "Speed", "measure_speed",
]
