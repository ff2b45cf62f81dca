"""Measurement on a locked protocol: quality, size and speed."""

from slimlm.eval.protocol import (PROTOCOLS, Protocol, calibration_ids, calibration_record, for_tokenizer, get_protocol,
                                 with_user_text)
from slimlm.eval.quality import BaseStats, Quality, kl_to_base, score_windows
from slimlm.eval.result import Result, check_comparable, format_results, load_result, load_results, save_results
from slimlm.eval.runner import eval_tokens, evaluate
from slimlm.models.size import SizeReport, measure_size
from slimlm.eval.speed import Speed, measure_speed

__all__ = [
    "PROTOCOLS", "Protocol", "calibration_ids", "calibration_record", "for_tokenizer", "get_protocol", "with_user_text",
    "BaseStats", "Quality", "kl_to_base", "score_windows", "Result", "check_comparable", "format_results",
    "load_result", "load_results", "save_results", "eval_tokens", "evaluate", "SizeReport", "measure_size", "Speed", "measure_speed",
]
