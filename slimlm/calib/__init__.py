"""Calibration: the block-by-block runner and the statistics it gathers.

Lazy (larger-than-RAM) compression, which drives methods through this runner
one block in memory at a time, is a pipeline above the methods:
:mod:`slimlm.pipelines.lazy`.
"""

from slimlm.calib.runner import BlockContext, CalibReport, Group, calibrate_blocks, capture_block_inputs
from slimlm.calib.stats import LinearStats, StatsSpec

__all__ = ["BlockContext", "CalibReport", "Group", "LinearStats", "StatsSpec", "calibrate_blocks",
           "capture_block_inputs"]
