"""Shared second-order solvers: the OBS column loop behind GPTQ and SparseGPT, its set-up,
GPTQ's rounding grid and the solve under a sparsity mask."""

from slimlm.solvers.grid import GPTQ_SCHEMES, ColumnGrid, check_gptq_scheme, column_grid, grid_solve
from slimlm.solvers.masked import MaskedColumns, SparseResult, masked_solve, solve_with_mask
from slimlm.solvers.obs import LazyBlock, ObsProblem, check_layer, dampen_and_invert, obs_solve, prepare

__all__ = ["GPTQ_SCHEMES", "ColumnGrid", "LazyBlock", "MaskedColumns", "ObsProblem", "SparseResult",
           "check_gptq_scheme", "check_layer", "column_grid", "dampen_and_invert", "grid_solve", "masked_solve", "obs_solve",
           "prepare", "solve_with_mask"]  # fmt: skip
