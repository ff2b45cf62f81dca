"""Mixed-precision bit allocation: one scheme per linear under an average bits-per-weight budget.

HAWQ-V2/V3 (Dong et al., arXiv:1911.03852; Yao et al., arXiv:2011.10680)
measure each layer's sensitivity with second-order information and pick bit
widths by an integer program under a size budget. Here, as in HAWQ-V3's
"Hessian-aware" objective and in the layer-wise setting of OBQ/GPTQ
(Frantar et al., arXiv:2208.11580), the sensitivity of linear ``l`` to
scheme ``c`` is the error its quantization adds to the layer's output on the
calibration inputs X::

    err[l, c] = tr((W - Q_c(W)) H (W - Q_c(W))^T),   H = 2/n X^T X
              = 2/n || X (W - Q_c(W))^T ||_F^2

This layer-local error ignores how much the rest of the network amplifies
or absorbs a layer's damage, and on SmolLM2-135M it led the allocation to
cheap 2-bit layers that wrecked the model (benchmarks/RESULTS.md). The
default sensitivity is therefore end-to-end: the diagonal empirical Fisher
``F = sum_s (dL_s/dW)^2`` of the language-model loss over calibration
sequences ``s`` (HAWQ's trace-of-Hessian in its diagonal Fisher form, as in
SqueezeLLM, Kim et al. arXiv:2306.07629), so by a second-order expansion::

    err[l, c] = 1/2 * sum_ij F_ij (W - Q_c(W))_ij^2  ~  increase of the loss

and the allocation solves the multiple-choice knapsack::

    minimise   sum_l err[l, choice_l]
    subject to sum_l n_l * bpw[l, choice_l] <= budget * sum_l n_l

where ``n_l`` is the layer's number of weights and ``bpw`` the true stored
bits per weight (codes, scales and zeros; :func:`slimlm.formats.bits_per_weight`).

The knapsack is solved by dynamic programming over a discretised budget
(:func:`allocate`): costs are the extra bits over each layer's cheapest
scheme, rounded *up* to units of 1/resolution of the largest possible extra,
so a solution feasible in units is feasible in bits (the unit is the gcd of
the integer bit costs when that fits, making the DP exact). A greedy pass with the
exact costs then spends the slack the rounding left (best error reduction
per extra bit first), so the result never exceeds the budget and ends close
to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from slimlm.errors import SlimlmError
from slimlm.formats import Scheme, fake_quantize
from slimlm.formats.granularity import PerGroup


def fits(scheme: Scheme, shape: tuple[int, int]) -> bool:
    """Whether ``scheme``'s group size divides the inputs of an ``(out, in)`` weight."""
    g = getattr(scheme, "granularity", None)
    return not isinstance(g, PerGroup) or shape[1] % g.size == 0


@torch.no_grad()
def hessian_error(W: Tensor, Wq: Tensor, H: Tensor) -> float:
    """``tr(E H E^T)`` with ``E = W - Wq``: the layer-output squared error (float32)."""
    E = W.float() - Wq.float()  # (out, in)
    return float(((E @ H.float()) * E).sum())


@torch.no_grad()
def fisher_error(W: Tensor, Wq: Tensor, F: Tensor) -> float:
    """``1/2 sum F * (W - Wq)^2``: the second-order estimate of the loss increase (float32)."""
    return 0.5 * float((F.float() * (W.float() - Wq.float()).square()).sum())


@torch.no_grad()
def sensitivities(W: Tensor, H: Tensor | None, schemes: Sequence[Scheme], *, normalize: bool = False,
                  fisher: Tensor | None = None) -> Tensor:  # fmt: skip
    """``(K,)`` float64 error of RTN at each scheme for ``W (out, in)``.

    With ``fisher`` (the diagonal Fisher of ``W``, same shape) the Fisher-weighted
    error; otherwise the Hessian-weighted layer-output error, divided by
    ``tr(W H W^T)`` (the layer's output energy) with ``normalize``, so the
    objective is a sum of relative output errors. A scheme whose group size does
    not divide the layer's inputs gets ``inf`` (never chosen).
    """
    errs = torch.full((len(schemes),), float("inf"), dtype=torch.float64)
    for k, s in enumerate(schemes):
        if not fits(s, tuple(W.shape)):
            continue
        Wq = fake_quantize(W, s)
        errs[k] = fisher_error(W, Wq, fisher) if fisher is not None else hessian_error(W, Wq, H)
    if fisher is None and normalize:
        W32 = W.float()
        errs = errs / max(float(((W32 @ H.float()) * W32).sum()), 1e-30)
    return errs


def _check_problem(errors: Tensor, bpw: Tensor, n_weights: Tensor) -> None:
    if errors.dim() != 2 or errors.shape != bpw.shape or n_weights.shape != errors.shape[:1]:
        raise SlimlmError(f"errors and bpw must be (layers, choices) and n_weights (layers,); got "
                          f"{tuple(errors.shape)}, {tuple(bpw.shape)}, {tuple(n_weights.shape)}")  # fmt: skip
    if errors.isnan().any() or (errors < 0).any() or not torch.isfinite(errors).any(dim=1).all():
        raise SlimlmError("sensitivities must be >= 0 with a finite one per layer (inf = scheme not allowed there); "
                          "check the calibration data and weights")  # fmt: skip


def _mask_invalid(errors: Tensor, bpw: Tensor) -> Tensor:
    """``bpw`` with each layer's disallowed choices (``inf`` error) priced at its dearest allowed one.

    So a disallowed choice is never cheaper than an allowed one, and its
    infinite error keeps it out of every optimum.
    """
    ok = torch.isfinite(errors)
    dearest = torch.where(ok, bpw, torch.full_like(bpw, -1.0)).amax(dim=1, keepdim=True)  # (L, 1)
    return torch.where(ok, bpw, dearest.expand_as(bpw))


def min_bpw(bpw: Tensor, n_weights: Tensor) -> float:
    """The smallest average bits per weight any allocation reaches (every layer at its cheapest)."""
    n = n_weights.double()
    return float((bpw.double().amin(dim=1) * n).sum() / n.sum())


def average_bpw(choice: Tensor, bpw: Tensor, n_weights: Tensor) -> float:
    """Average bits per weight of an allocation, weighted by each layer's number of weights."""
    n = n_weights.double()
    picked = bpw.double().gather(1, choice.view(-1, 1)).squeeze(1)
    return float((picked * n).sum() / n.sum())


def total_error(choice: Tensor, errors: Tensor) -> float:
    return float(errors.double().gather(1, choice.view(-1, 1)).sum())


@torch.no_grad()
def _knapsack_dp(errors: Tensor, units: Tensor, capacity: int) -> Tensor:
    """Multiple-choice knapsack: min sum errors[l, c_l] with sum units[l, c_l] <= capacity.

    Core loop (one layer at a time): ``best[b]`` is the least error of the
    layers so far using at most ``b`` units; ``arg[l, b]`` the choice of
    layer ``l`` on that optimum, for backtracking.
    """
    L, K = errors.shape
    best = torch.zeros(capacity + 1, dtype=torch.float64)  # no layers: zero error at any budget
    arg = torch.zeros(L, capacity + 1, dtype=torch.int8)
    for layer in range(L):
        cand = torch.full((K, capacity + 1), float("inf"), dtype=torch.float64)  # (K, B+1)
        for c in range(K):
            u = int(units[layer, c])
            if u <= capacity:
                cand[c, u:] = best[: capacity + 1 - u] + errors[layer, c]
        best, arg[layer] = cand.min(dim=0)
    choice = torch.empty(L, dtype=torch.long)
    b = capacity
    for layer in reversed(range(L)):
        choice[layer] = int(arg[layer, b])
        b -= int(units[layer, choice[layer]])
    return choice


def _greedy_fill(choice: Tensor, errors: Tensor, cost: Tensor, slack: float) -> Tensor:
    """Spend ``slack`` bits on the upgrades that cut error most per extra bit, exact costs."""
    choice = choice.clone()
    while True:
        extra = cost - cost.gather(1, choice.view(-1, 1))  # (L, K) bits each switch adds
        gain = errors.gather(1, choice.view(-1, 1)) - errors  # (L, K) error each switch removes
        ok = (gain > 0) & (extra <= slack)
        if not ok.any():
            return choice
        free = ok & (extra <= 0)  # switches that also save bits come first, largest gain
        if free.any():
            score = torch.where(free, gain, torch.full_like(gain, -1.0))
        else:
            score = torch.where(ok, gain / extra.clamp(min=1e-300), torch.full_like(gain, -1.0))
        flat = int(torch.argmax(score))
        layer, c = divmod(flat, errors.shape[1])
        slack -= float(extra[layer, c])
        choice[layer] = c


def _exact_unit(extra: Tensor, span: float, resolution: int) -> float | None:
    """The gcd of the integer extra costs when the budget fits ``resolution`` units of it (then the DP is exact)."""
    ints = extra.round().long()
    if not torch.equal(ints.double(), extra):
        return None
    g = math.gcd(*ints.flatten().unique().tolist())
    return float(g) if g > 0 and span / g <= resolution else None


@torch.no_grad()
def allocate(errors: Tensor, bpw: Tensor, n_weights: Tensor, budget_bpw: float, *,
             resolution: int = 1 << 16) -> Tensor:  # fmt: skip
    """Choice ``(L,)`` long per layer minimising summed ``errors (L, K)`` under ``budget_bpw``.

    ``bpw (L, K)`` are each layer's true bits per weight per choice and
    ``n_weights (L,)`` its size; an ``inf`` error marks a choice not allowed
    for that layer (its ``bpw`` is then ignored). The average bpw of the result is
    ``<= budget_bpw`` (exactly checked); raises if even the cheapest
    allocation exceeds the budget.
    """
    errors, bpw, n = errors.double(), bpw.double(), n_weights.double()
    _check_problem(errors, bpw, n)
    bpw = _mask_invalid(errors, bpw)
    floor = min_bpw(bpw, n)
    if budget_bpw < floor - 1e-12:
        raise SlimlmError(f"budget {budget_bpw:.4f} bpw is below the cheapest allocation {floor:.4f} bpw; "
                          f"raise budget_bpw or add a cheaper candidate scheme")  # fmt: skip
    cost = bpw * n[:, None]  # (L, K) stored bits
    extra = cost - cost.amin(dim=1, keepdim=True)  # (L, K) bits over each layer's cheapest
    slack = budget_bpw * float(n.sum()) - float(cost.amin(dim=1).sum())  # bits to spend
    span = float(extra.amax(dim=1).sum())
    if span <= 0 or slack <= 0:
        choice = torch.argmin(torch.where(extra == 0, errors, torch.full_like(errors, float("inf"))), dim=1)
    else:
        unit = _exact_unit(extra, span, resolution) or span / resolution
        units = torch.ceil(extra / unit - 1e-9).clamp(min=0).long()  # (L, K), rounded up: feasible in bits
        choice = _knapsack_dp(errors, units, min(resolution, int(slack // unit)))
    used = float(extra.gather(1, choice.view(-1, 1)).sum())
    choice = _greedy_fill(choice, errors, extra, slack - used)
    if average_bpw(choice, bpw, n) > budget_bpw + 1e-9:
        raise SlimlmError("allocation exceeds the budget")  # the exactness check; unreachable by construction
    return choice
