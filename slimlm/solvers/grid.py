"""GPTQ's quantization grid: the per-column rounding callback of the OBS solver.

Frantar, Ashkboos, Hoefler, Alistarh. "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", ICLR 2023
(arXiv:2210.17323). GPTQ, SparseGPT's joint mode and GPTQ on an already
pruned layer all round column ``j`` with this grid when the solver reaches it:

* static groups: each contiguous group's scale/zero computed from ``W``
  before the solve, so groups stay contiguous in the stored layout whatever
  the solve order; without them a group's parameters are computed from the
  updated weights when the loop reaches its first column (in solve order);
* per-channel and per-tensor parameters and the ternary row scale are
  always computed from ``W`` before the solve.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.errors import SlimlmError
from slimlm.formats import IntScheme, PerChannel, PerGroup, QuantizedWeight, Scheme, TernaryScheme
from slimlm.formats.affine import affine_dequantize, affine_params, affine_qrange, affine_quantize
from slimlm.formats.ternary import ternary_quantize
from slimlm.solvers.affine_loop import obs_solve_affine
from slimlm.solvers.obs import LazyBlock, obs_solve

GPTQ_SCHEMES = (IntScheme, TernaryScheme)


def check_gptq_scheme(scheme: Scheme) -> None:
    if not isinstance(scheme, GPTQ_SCHEMES):
        raise SlimlmError(f"GPTQ quantizes to IntScheme (2..8 bits) or TernaryScheme, got {scheme!r}; "
                          "use RTN for NF4, k-means and binary")  # fmt: skip


class _IntGrid:
    """Scales/zeros of an IntScheme and the per-column rounding against them, in original column order."""

    def __init__(self, W: Tensor, s: IntScheme, perm: Tensor, static: bool):
        self.s, self.perm = s, perm
        n_out, n_in = W.shape
        gran = s.granularity
        self.G = gran.size if isinstance(gran, PerGroup) else n_in  # columns sharing one parameter column
        self.dynamic = isinstance(gran, PerGroup) and not static and self.G < n_in
        self.codes = torch.zeros(W.shape, dtype=torch.int8 if s.symmetric else torch.uint8, device=W.device)
        if self.dynamic:
            self.scale = torch.zeros(n_out, n_in // self.G, device=W.device)
            self.zero = torch.zeros_like(self.scale)
            self.ready = [False] * (n_in // self.G)
        else:  # static: from W before the solve, exactly as RTN computes them
            self.scale, self.zero = affine_params(W, bits=s.bits, symmetric=s.symmetric, granularity=gran,
                                                  clip_search=s.clip_search)  # fmt: skip
        self.inv = torch.argsort(perm)  # original column -> solve position
        self.cols = perm.tolist()  # solve position -> original column, as ints for the column loop
        self.one_column = self.scale.shape[1] == 1  # per channel or per tensor
        self.block: LazyBlock | None = None

    def on_block(self, block: LazyBlock) -> None:
        self.block = block

    def _params_for(self, c: int) -> tuple[Tensor, Tensor]:
        """``(scale, zero)`` ``(R, 1)`` of original column ``c``; a dynamic group's on first touch."""
        g = 0 if self.one_column else c // self.G
        if self.dynamic and not self.ready[g]:
            cols = self.inv[g * self.G : (g + 1) * self.G]  # the group's solve positions
            Wg = self.block.current(cols)  # (out, G) updated weights of the group
            sc, zr = affine_params(Wg, bits=self.s.bits, symmetric=self.s.symmetric, granularity=PerChannel(),
                                   clip_search=self.s.clip_search)  # fmt: skip
            self.scale[:, g : g + 1], self.zero[:, g : g + 1] = sc, zr
            self.ready[g] = True
        return self.scale[:, g : g + 1], self.zero[:, g : g + 1]

    def __call__(self, j: int, w: Tensor) -> Tensor:
        c = self.cols[j]
        scale, zero = self._params_for(c)
        if scale.shape[0] == 1:  # per tensor: one scale for every row
            scale, zero = scale.expand(w.shape[0], 1), zero.expand(w.shape[0], 1)
        q = affine_quantize(w.unsqueeze(1), scale, zero, bits=self.s.bits, symmetric=self.s.symmetric)  # (out, 1)
        self.codes[:, c] = q[:, 0]
        return affine_dequantize(q, scale, None if self.s.symmetric else zero)[:, 0]

    def result(self, shape: tuple[int, int]) -> QuantizedWeight:
        zero = None if self.s.symmetric else self.zero
        return QuantizedWeight(self.s, shape, self.codes, scale=self.scale, zero=zero)

    def solve_order_params(self) -> tuple[Tensor, Tensor | None] | None:
        """Every column's ``(scale, zero)`` ``(out, in)`` in solve order (zero None when symmetric); None if dynamic."""
        if self.dynamic:
            return None
        groups = torch.zeros_like(self.perm) if self.one_column else self.perm // self.G  # (in,) solve -> group
        groups = groups.to(self.scale.device)
        n_out = self.codes.shape[0]
        scale = self.scale[:, groups].expand(n_out, -1).contiguous()  # (out, in); a (1, 1) per-tensor scale too
        zero = None if self.s.symmetric else self.zero[:, groups].expand(n_out, -1).contiguous()
        return scale, zero


class _TernaryGrid:
    """Ternary ``{-a, 0, a}``: the row scale ``a`` from W (TWN), columns rounded to the nearest level."""

    def __init__(self, W: Tensor, s: TernaryScheme, perm: Tensor):
        self.s, self.perm = s, perm
        _, self.scale = ternary_quantize(W, threshold=s.threshold)  # (out, 1)
        self.codes = torch.zeros(W.shape, dtype=torch.int8, device=W.device)
        self.on_block = None

    def __call__(self, j: int, w: Tensor) -> Tensor:
        a = self.scale[:, 0]  # (out,)
        q = torch.where(a > 0, torch.round(w / a.clamp(min=1e-30)).clamp(-1, 1), torch.zeros_like(w))
        self.codes[:, int(self.perm[j])] = q.to(torch.int8)
        return q * a

    def result(self, shape: tuple[int, int]) -> QuantizedWeight:
        return QuantizedWeight(self.s, shape, self.codes, scale=self.scale)


ColumnGrid = _IntGrid | _TernaryGrid


def grid_solve(grid: ColumnGrid, W: Tensor, Hinv: Tensor, *, blocksize: int) -> Tensor:
    """Run the OBS loop on ``W (out, in)`` (solve order) rounding with ``grid``; the codes land in the grid.

    Fixed affine parameters take :func:`obs_solve_affine` (same codes, bit
    for bit, at a fraction of the per-column work); dynamic groups and
    ternary take the generic :func:`obs_solve`. Returns the column losses ``(in,)``.
    """
    fixed = grid.solve_order_params() if isinstance(grid, _IntGrid) else None
    if fixed is None:
        return obs_solve(W, Hinv, grid, on_block=grid.on_block, blocksize=blocksize)[1]
    qmin, qmax = affine_qrange(grid.s.bits, grid.s.symmetric)
    codes, _, losses = obs_solve_affine(W, Hinv, *fixed, qmin=qmin, qmax=qmax, blocksize=blocksize)
    grid.codes[:, grid.perm.to(codes.device)] = codes.to(grid.codes.dtype)  # solve order -> original columns
    return losses


def column_grid(W: Tensor, scheme: Scheme, perm: Tensor, *, static_groups: bool = True) -> ColumnGrid:
    """GPTQ's per-column rounding of ``W (out, in)`` solved in column order ``perm``.

    The grid is the ``quantize_column`` callback of :func:`obs_solve` (call its
    ``on_block`` from the solver's hook); ``grid.result(shape)`` is the
    :class:`QuantizedWeight`, codes in the original column order. SparseGPT's joint
    mode and GPTQ on a pruned layer round their surviving weights with the same grid.
    """
    check_gptq_scheme(scheme)
    if isinstance(scheme, IntScheme):
        return _IntGrid(W, scheme, perm.cpu(), static_groups)
    return _TernaryGrid(W, scheme, perm.cpu())
