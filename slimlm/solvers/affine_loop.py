"""GPTQ's column loop with the rounding to fixed affine parameters written inline.

The same loop as :func:`slimlm.solvers.obs.obs_solve` (Frantar et al.,
arXiv:2210.17323, Algorithm 1), specialised to the common case where every
column's scale and zero are known before the solve (static groups, per
channel, per tensor). Per column it does only what the maths needs (round
against the column's parameters, the scaled error, the in-block rank-1
update), with the same float operations in the same order as
:func:`slimlm.formats.affine.affine_quantize` / ``affine_dequantize`` and
``obs_solve``, so the codes, the dequantized weight and the losses are
bit-for-bit those of the generic loop (tested against it). The codes of a
lazy block are taken once, at its end, from its columns as they were when
each was fixed: a column is never updated after its turn.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.errors import SlimlmError


@torch.no_grad()
def obs_solve_affine(
    W: Tensor,
    Hinv: Tensor,
    scale: Tensor,
    zero: Tensor | None,
    *,
    qmin: int,
    qmax: int,
    blocksize: int = 128,
) -> tuple[Tensor, Tensor, Tensor]:
    """Round the columns of ``W (out, in)`` left to right to ``(c - zero) * scale``, compensating as OBS does.

    ``Hinv`` is the upper Cholesky factor of the dampened inverse Hessian in
    ``W``'s column order; ``scale`` and ``zero`` ``(out, in)`` are each
    column's parameters in that order (``zero`` None: symmetric, codes signed).
    Returns ``(codes, Q, losses)``: integer codes as float32 ``(out, in)``, the
    fixed weight ``(c - zero) * scale`` ``(out, in)`` and the column losses ``(in,)``.
    """
    if W.dim() != 2 or Hinv.shape != (W.shape[1], W.shape[1]) or scale.shape != W.shape:
        raise SlimlmError(f"W must be (out, in), Hinv (in, in) and scale (out, in); got {tuple(W.shape)}, "
                          f"{tuple(Hinv.shape)} and {tuple(scale.shape)}")  # fmt: skip
    W = W.float().clone()
    n_out, n_in = W.shape
    codes, Q = torch.empty_like(W), torch.empty_like(W)
    losses = torch.empty(n_in, device=W.device)
    c = torch.empty(n_out, device=W.device)  # one column's codes, reused
    # --- the paper's core loop (GPTQ Algorithm 1), rounding inlined ---
    for i1 in range(0, n_in, blocksize):
        i2 = min(i1 + blocksize, n_in)
        W1, S1 = W[:, i1:i2].clone(), scale[:, i1:i2]  # (out, B)
        Z1 = None if zero is None else zero[:, i1:i2]
        Hinv1 = Hinv[i1:i2, i1:i2]  # (B, B)
        d = Hinv1.diagonal()
        Err1 = torch.empty(n_out, i2 - i1, device=W.device)
        for i in range(i2 - i1):
            w, s = W1[:, i], S1[:, i]  # w is final: only later columns are updated
            torch.round(torch.div(w, s, out=c), out=c)  # affine_quantize: round(w / s) (+ z), clamped
            if Z1 is not None:
                c.add_(Z1[:, i])
            c.clamp_(qmin, qmax)
            q = c - Z1[:, i] if Z1 is not None else c  # affine_dequantize: (c - z) * s
            torch.div(w - q * s, d[i], out=Err1[:, i])  # (out,) scaled error
            W1[:, i + 1 :].addr_(Err1[:, i], Hinv1[i, i + 1 :], alpha=-1.0)  # in-block OBS update
        C1 = torch.round(W1 / S1)  # (out, B): the block's codes, from the columns as they were fixed
        if Z1 is not None:
            C1 += Z1
        codes[:, i1:i2] = C1.clamp_(qmin, qmax)
        Q[:, i1:i2] = (C1 - Z1 if Z1 is not None else C1) * S1
        losses[i1:i2] = Err1.square().sum(0) / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy update of every later column, (out, n_in - i2)
    return codes, Q, losses
