"""Calibration: the block-by-block runner, the statistics it gathers, and lazy (larger-than-RAM) compression."""

from slimlm.calib.runner import BlockContext, CalibReport, Group, calibrate_blocks, capture_block_inputs
from slimlm.calib.stats import LinearStats, StatsSpec
from slimlm.calib.streaming import check_lazy, compress_lazy

__all__ = ["BlockContext", "CalibReport", "Group", "LinearStats", "StatsSpec", "calibrate_blocks",
           "capture_block_inputs", "check_lazy", "compress_lazy"]
