"""Calibration: the block-by-block runner and the statistics it gathers."""

from slimlm.calib.runner import BlockContext, CalibReport, Group, calibrate_blocks, capture_block_inputs
from slimlm.calib.stats import LinearStats, StatsSpec

__all__ = ["BlockContext", "CalibReport", "Group", "LinearStats", "StatsSpec", "calibrate_blocks",
           "capture_block_inputs"]
