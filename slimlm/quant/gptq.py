"""GPTQ: layer-wise quantization by Optimal Brain Surgeon column updates.

Frantar, Ashkboos, Hoefler, Alistarh. "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", ICLR 2023
(arXiv:2210.17323).

For one linear with weight ``W (out, in)`` and calibration inputs ``X``,
GPTQ minimises ``||W X - Q X||^2`` over ``Q`` on the quantization grid. The
columns of ``W`` are rounded one at a time and the rounding error of each is
spread over the columns not yet rounded through the inverse Hessian of
``H = 2/n X X^T`` (the column loop is :func:`slimlm.solvers.obs_solve`).
The paper's set-up (dead inputs, act-order, dampening) is
:func:`slimlm.solvers.prepare`; its rounding, with static or dynamic group
parameters, is :func:`slimlm.solvers.column_grid`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.formats import IntScheme, PerGroup, QuantizedWeight, Scheme
from slimlm.formats.granularity import check_group_size
from slimlm.solvers import GPTQ_SCHEMES, check_gptq_scheme, check_layer, column_grid, grid_solve, prepare

__all__ = ["GPTQ_SCHEMES", "check_gptq_scheme", "gptq_quantize"]


@torch.no_grad()
def gptq_quantize(
    W: Tensor,
    H: Tensor,
    scheme: Scheme,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = True,
) -> tuple[QuantizedWeight, dict]:
    """Quantize ``W (out, in)`` given the input Hessian ``H (in, in) = 2/n X^T X``.

    Returns ``(qweight, stats)``: the weight in ``scheme``'s format (groups
    contiguous in the original column order) and ``{"loss": sum of the
    per-column OBS losses, "damp": dampening used, "dead": dead inputs,
    "seconds": time}``.
    """
    check_gptq_scheme(scheme)
    check_layer(W, H)
    if isinstance(scheme, IntScheme) and isinstance(scheme.granularity, PerGroup):
        check_group_size(W.shape[1], scheme.granularity.size)
    prob = prepare(W, H, percdamp=percdamp, act_order=act_order)
    grid = column_grid(prob.W, scheme, prob.perm, static_groups=static_groups)
    losses = grid_solve(grid, prob.W[:, prob.perm], prob.Hinv, blocksize=blocksize)
    return grid.result(tuple(prob.W.shape)), prob.stats(losses)
