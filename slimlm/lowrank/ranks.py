"""Which rank each layer keeps: pure functions of shapes and singular values.

An ``m x n`` weight (``out x in``) factorized at rank ``r`` holds ``r (m + n)``
weights, fewer than the dense ``m n`` only while ``r < m n / (m + n)``.

``spectrum_ranks`` spends one parameter budget across layers greedily: the
singular direction ``i`` of layer ``l`` buys ``e_li = s_li^2 / sum_j s_lj^2``
(its share of the layer's whitened energy, so that layers of different scale
compare; with SVD-LLM's whitening ``s_li^2`` is exactly the output error the
direction removes) for ``m_l + n_l`` parameters. Every layer starts at rank 1;
then, from a heap holding each layer's *next* step, the step with the most
energy per parameter is taken while it fits. Within a layer ``e`` decreases
and the price is constant, so (fractional knapsack) the choice minimises the
summed relative dropped energy up to the last step that did not fit. A layer at
the last rank below break-even has one more step: going dense, which buys all
its remaining energy for the ``m n - r (m + n)`` weights the dense matrix costs
beyond its factors (so no layer is ever stored larger than dense).
"""

from __future__ import annotations

import heapq
import math

from torch import Tensor

from slimlm.errors import SlimlmError

Shape = tuple[int, int]  # (out, in)


def kept_params(shape: Shape, rank: int | None) -> int:
    """Weights a layer holds: ``rank (m + n)``, or ``m n`` when left dense (rank None)."""
    m, n = shape
    return m * n if rank is None else rank * (m + n)


def is_dense_cheaper(shape: Shape, rank: int) -> bool:
    """Two factors at ``rank`` hold at least as many weights as the dense matrix."""
    m, n = shape
    return rank * (m + n) >= m * n


def uniform_rank(shape: Shape, params: float) -> int:
    """``floor((1 - params) m n / (m + n))``: the largest rank keeping at most ``1 - params`` of the weights."""
    m, n = shape
    return math.floor((1.0 - params) * m * n / (m + n) + 1e-9)


def max_uniform_params(shapes: dict[str, Shape]) -> float:
    """The largest ``params`` for which every layer keeps rank >= 1 under uniform allocation."""
    return min(1.0 - (m + n) / (m * n) for m, n in shapes.values())


def energy_rank(s: Tensor, energy: float) -> int:
    """The smallest rank whose truncation keeps at least ``energy`` of ``sum s^2`` (at least 1)."""
    e = s.double().square()
    kept = e.cumsum(0) / e.sum().clamp_min(1e-300)  # kept[r-1]: the share rank r keeps
    return int(min(int((kept < energy - 1e-12).sum()) + 1, s.numel()))


def _next_item(e: Tensor, rank: int | None, shape: Shape) -> tuple[float, int] | None:
    """(gain, cost) of a layer's next step from ``rank``: one more direction, or, at the last rank below
    break-even, going dense (all the energy left, for the weights dense costs beyond the factors)."""
    if rank is None:
        return None
    m, n = shape
    if not is_dense_cheaper(shape, rank + 1):
        return float(e[rank]), m + n
    return float(e[rank:].sum()), m * n - rank * (m + n)


def spectrum_ranks(spectra: dict[str, Tensor], shapes: dict[str, Shape], params: float) -> dict[str, int | None]:
    """Ranks of every layer under one budget (keep at most ``1 - params`` of the layers' dense weights);
    None marks a layer left dense."""
    dense = sum(m * n for m, n in shapes.values())
    budget = (1.0 - params) * dense
    floor_cost = sum(m + n for m, n in shapes.values())
    if floor_cost > budget:
        raise SlimlmError(f"params {params} removes everything: rank 1 in every target needs {floor_cost:,} "
                          f"weights, {budget:,.0f} allowed; the largest params that keeps rank 1 everywhere is "
                          f"{1 - floor_cost / dense:.4f}")  # fmt: skip
    ranks: dict[str, int | None] = dict.fromkeys(spectra, 1)
    energy = {}
    for name, s in spectra.items():
        e = s.double().square()
        energy[name] = e / e.sum().clamp_min(1e-300)  # share of the layer's energy per direction
    heap = []
    for name in spectra:
        item = _next_item(energy[name], 1, shapes[name])
        if item is not None:
            heapq.heappush(heap, (-item[0] / item[1], item[1], name))
    left = budget - floor_cost
    while heap:
        _, cost, name = heapq.heappop(heap)
        if cost > left:  # this layer's next step does not fit: it stops here
            continue
        left -= cost
        rank = ranks[name] + 1
        ranks[name] = None if is_dense_cheaper(shapes[name], rank) else rank
        item = _next_item(energy[name], ranks[name], shapes[name])
        if item is not None:
            heapq.heappush(heap, (-item[0] / item[1], item[1], name))
    return ranks
