"""Rank choice as pure functions: the uniform formula, energy thresholds, the global spectrum allocation."""

import itertools

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.lowrank.ranks import energy_rank, is_dense_cheaper, kept_params, spectrum_ranks, uniform_rank


@pytest.mark.parametrize("shape", [(64, 64), (32, 64), (1536, 576), (576, 1536), (192, 576)])
@pytest.mark.parametrize("params", [0.05, 0.2, 0.4, 0.75])
def test_uniform_rank_keeps_at_most_its_share_within_one_rank_step(shape, params):
    m, n = shape
    r = uniform_rank(shape, params)
    assert kept_params(shape, r) <= (1 - params) * m * n < kept_params(shape, r + 1)


def test_uniform_rank_on_exact_boundaries():
    assert uniform_rank((64, 64), 0.5) == 16  # 0.5 * 4096 / 128 = 16 exactly: not 15 by float rounding
    assert uniform_rank((576, 576), 0.2) == 230  # floor(0.8 * 288 = 230.4)


def test_energy_rank_is_the_smallest_rank_keeping_the_share():
    s = torch.tensor([3.0, 2.0, 1.0, 1.0, 0.5], dtype=torch.float64).sqrt()  # energies 3, 2, 1, 1, 0.5 of 7.5
    assert energy_rank(s, 0.4) == 1  # 3 / 7.5 = 0.4 exactly
    assert energy_rank(s, 0.41) == 2
    assert energy_rank(s, 0.8) == 3  # 6 / 7.5 = 0.8
    assert energy_rank(s, 0.99) == 5


def _spectra(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (64, 64), "b": (32, 64), "c": (128, 64), "d": (64, 128)}
    decay = {"a": 0.5, "b": 0.95, "c": 0.8, "d": 0.99}  # a: energy in few directions; d: nearly flat
    spectra = {k: (decay[k] ** torch.arange(min(v), dtype=torch.float64)) * (1 + 0.01 * torch.rand(min(v),
               generator=g, dtype=torch.float64)) for k, v in shapes.items()}  # fmt: skip
    return {k: s.sort(descending=True).values for k, s in spectra.items()}, shapes


def _dropped(spectra, ranks):
    total = 0.0
    for k, s in spectra.items():
        e = s.square() / s.square().sum()
        total += 0.0 if ranks[k] is None else float(e[ranks[k]:].sum())
    return total


@pytest.mark.parametrize("params", [0.2, 0.4, 0.6])
def test_spectrum_allocation_meets_the_budget_and_follows_the_spectra(params):
    spectra, shapes = _spectra()
    ranks = spectrum_ranks(spectra, shapes, params)
    dense = sum(m * n for m, n in shapes.values())
    kept = sum(kept_params(shapes[k], r) for k, r in ranks.items())
    assert kept <= (1 - params) * dense
    assert kept > (1 - params) * dense - max(m + n for m, n in shapes.values())  # within one rank step
    for k, r in ranks.items():
        assert r is None or (1 <= r and not is_dense_cheaper(shapes[k], r))
    # fast decay: few directions hold it all, so "a" keeps the lowest rank; flat "d" the highest share
    assert ranks["a"] == min(r for r in ranks.values() if r is not None)
    assert ranks["d"] is None or ranks["d"] / 64 >= max(r / min(shapes[k]) for k, r in ranks.items() if r)
    # no better allocation among uniform-fraction ones
    for r_a, r_b in itertools.product(range(1, 32), range(1, 21)):
        alt = dict(ranks, a=r_a, b=r_b)
        if sum(kept_params(shapes[k], r) for k, r in alt.items()) <= kept:
            assert _dropped(spectra, alt) >= _dropped(spectra, ranks) - 1e-12


def test_spectrum_allocation_can_leave_a_layer_dense():
    shapes = {"flat": (64, 64), "steep": (64, 64)}
    spectra = {"flat": torch.ones(64, dtype=torch.float64), "steep": 0.3 ** torch.arange(64, dtype=torch.float64)}
    ranks = spectrum_ranks(spectra, shapes, 0.3)  # 0.7 * 8192 = 5734 weights: flat dense + steep rank <= 12
    assert ranks["flat"] is None and 1 <= ranks["steep"] <= 12


def test_spectrum_allocation_refuses_a_budget_that_removes_everything():
    spectra, shapes = _spectra()
    with pytest.raises(SlimlmError, match=r"params 0.999 removes everything.*largest params .* is 0\.9"):
        spectrum_ranks(spectra, shapes, 0.999)
