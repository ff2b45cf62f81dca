"""AWQ: activation-aware weight quantization, as pure tensor functions.

Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration" (arXiv:2306.00978).

A few input channels of a linear carry much larger activations than the
rest; the weights that read them (*salient* weights) matter most to the
output. Scaling such a column up by ``s > 1`` before rounding, and the
activation down by ``1/s``, shrinks its relative rounding error, while
``W x = (W diag(s)) (diag(s)^-1 x)`` keeps the float function unchanged
(the ``1/s`` is folded into the op that produces ``x``). AWQ picks

    s = s_x ** alpha,   alpha* = argmin_alpha || Q(W diag(s)) (diag(s)^-1 X) - W X ||^2       (paper eq. 5)

on a grid of ``alpha`` in [0, 1), where ``s_x`` is the mean |x| per input
channel over calibration tokens; ``alpha = 0`` gives ``s = 1`` (plain RTN), so
the search never does worse than RTN on the data it sees. A clipping search
then shrinks each (row, group) range to minimise that group's share of the
output error.

The output error of a weight error ``D = W - W_hat`` on inputs ``X (n, in)`` is
``||X D^T||^2 = tr(D X^T X D^T)``: both searches take ``H ∝ X^T X`` (the
calibration runner's Hessian, gathered over every calibration token) instead
of the token rows, so their cost does not grow with the calibration set.
With inputs divided by ``s`` the Gram matrix becomes ``diag(1/s) H diag(1/s)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.errors import SlimlmError
from slimlm.validate import check_pos_int
from slimlm.formats import (
    IntScheme,
    PerTensor,
    QuantizedWeight,
    Scheme,
    affine_dequantize,
    affine_params,
    affine_quantize,
    fake_quantize,
    group_view,
)

MIN_SCALE = 1e-4  # floor on s_x ** alpha: a dead channel must not get a zero scale


def output_error(D: Tensor, H: Tensor) -> Tensor:
    """``tr(D H D^T)``: the squared output error of weight error ``D (out, in)`` on inputs with Gram ``H (in, in)``."""
    return ((D @ H) * D).sum()


def awq_scale(s_x: Tensor, alpha: float) -> Tensor:
    """``s = s_x ** alpha``, normalised by ``sqrt(max * min)`` so the scales straddle 1 (in,)."""
    s = s_x.float().pow(alpha).clamp(min=MIN_SCALE)
    return s / (s.max() * s.min()).sqrt()


def scaled_error(Ws: list[Tensor], H: Tensor, s: Tensor, scheme: Scheme) -> float:
    """Summed output error of the linears ``Ws`` (each (out, in)) when quantized as ``Q(W diag(s)) diag(s)^-1``."""
    err = 0.0
    for W in Ws:
        W_hat = fake_quantize(W * s, scheme) / s  # (out, in): what X sees after X -> X / s
        err += output_error(W - W_hat, H).item()
    return err


@torch.no_grad()
def awq_search_scale(
    Ws: list[Tensor], H: Tensor, s_x: Tensor, scheme: Scheme, *, grid: int = 20
) -> tuple[Tensor, float, list[float]]:
    """Search ``alpha`` in ``{0, 1/grid, ..., (grid-1)/grid}`` for the linears ``Ws`` sharing one input.

    ``Ws``: weights (out_i, in) of the linears that read the input; ``H (in, in)``:
    its Gram matrix (any positive multiple of ``X^T X``); ``s_x (in,)``: mean |x|
    per channel. Returns ``(s, alpha, errors per alpha)``; ties keep the smaller
    alpha, so ``alpha = 0`` (RTN, ``s = 1``) wins unless scaling strictly helps.
    """
    check_pos_int("grid", grid, "alphas tried, the paper uses 20")
    Ws = [W.float() for W in Ws]
    H = H.float()
    errors = [scaled_error(Ws, H, awq_scale(s_x, i / grid), scheme) for i in range(grid)]
    best = min(range(grid), key=lambda i: (errors[i], i))
    alpha = best / grid
    return awq_scale(s_x, alpha), alpha, errors


def _diag_blocks(H: Tensor, n_groups: int) -> Tensor:
    """The ``n_groups`` diagonal blocks of ``H (in, in)``: (g, n, n)."""
    n = H.shape[0] // n_groups
    return torch.stack([H[j * n : (j + 1) * n, j * n : (j + 1) * n] for j in range(n_groups)])


def group_output_errors(D: Tensor, H: Tensor, n_groups: int) -> Tensor:
    """Each (row, group)'s own output error ``d_rg H_gg d_rg^T`` (cross-group terms left out), (out, g)."""
    Dg = D.reshape(D.shape[0], n_groups, -1)  # (out, g, n)
    return torch.einsum("rgi,gij,rgj->rg", Dg, _diag_blocks(H, n_groups), Dg)


@torch.no_grad()
def awq_clip_quantize(
    W: Tensor, H: Tensor, scheme: IntScheme, *, grid: int = 20, max_shrink: float = 0.5
) -> QuantizedWeight:
    """Quantize ``W (out, in)`` in ``scheme``, shrinking each (row, group) range by the factor in
    ``{1, 1 - 1/grid, ..., > 1 - max_shrink}`` that minimises its output error on inputs with Gram ``H``.

    Factor 1 (plain RTN) is tried first and kept on ties. The chosen range is
    what the returned codes and scales store.
    """
    if not isinstance(scheme, IntScheme):
        raise SlimlmError(f"the clipping search needs an IntScheme, got {scheme!r}; set clip_search=False")
    W, H = W.float(), H.float()
    kw = dict(bits=scheme.bits, symmetric=scheme.symmetric)
    Wg = group_view(W, scheme.granularity)  # (R, g, n): one scale per [r, j, :]
    R, g = Wg.shape[:2]
    lo, hi = Wg.amin(-1, keepdim=True), Wg.amax(-1, keepdim=True)  # (R, g, 1)
    best_err = torch.full((R, g), float("inf"), device=W.device)
    best_scale, best_zero = torch.empty(R, g, device=W.device), torch.empty(R, g, device=W.device)
    for i in range(max(1, int(round(max_shrink * grid)))):
        f = 1.0 - i / grid
        Wc = torch.maximum(torch.minimum(Wg, hi * f), lo * f).reshape(W.shape)  # range shrunk by f
        scale, zero = affine_params(Wc, granularity=scheme.granularity, **kw)
        D = W - affine_dequantize(affine_quantize(W, scale, zero, **kw), scale, zero)  # (out, in)
        if isinstance(scheme.granularity, PerTensor):
            err = output_error(D, H).reshape(1, 1)
        else:
            err = group_output_errors(D, H, g)  # (out, g): rows of W are the R rows here
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    codes = affine_quantize(W, best_scale, best_zero, **kw)
    zero = None if scheme.symmetric else best_zero
    return QuantizedWeight(scheme, tuple(W.shape), codes, scale=best_scale, zero=zero)
