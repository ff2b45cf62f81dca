"""The Pareto frontier (lower x and lower y better): hand-made points, ties, duplicates, and a brute force."""

import itertools
import math
import random

import pytest

from slimlm.errors import SlimlmError
from slimlm.sweep.pareto import pareto_front


def brute_force(points):
    """The definition: i is kept unless some j is <= on both axes and < on one."""
    def dominated(i):
        return any(a <= points[i][0] and b <= points[i][1] and (a, b) != tuple(points[i]) for a, b in points)
    return sorted((i for i in range(len(points)) if not dominated(i)), key=lambda i: (points[i], i))


def test_hand_made():
    pts = [(1, 5), (2, 3), (3, 4), (4, 1), (5, 1)]
    assert pareto_front(pts) == [0, 1, 3]  # (3, 4) dominated by (2, 3); (5, 1) by (4, 1)


def test_order_is_by_x():
    assert pareto_front([(4, 1), (1, 5), (2, 3)]) == [1, 2, 0]


def test_ties_on_one_axis_are_dominated():
    assert pareto_front([(1, 3), (1, 2)]) == [1]  # same x, higher y
    assert pareto_front([(2, 2), (1, 2)]) == [1]  # same y, higher x


def test_duplicates_stay_together():
    assert pareto_front([(1, 2), (3, 1), (1, 2)]) == [0, 2, 1]  # two recipes with the same numbers: both
    assert pareto_front([(2, 2), (2, 2), (1, 1)]) == [2]  # duplicates of a dominated point: neither


def test_empty_and_single():
    assert pareto_front([]) == []
    assert pareto_front([(0.5, 7.0)]) == [0]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_refused(bad):
    with pytest.raises(SlimlmError, match="point 1"):
        pareto_front([(1.0, 1.0), (bad, 2.0)])


def test_matches_brute_force_with_many_ties():
    rng = random.Random(0)
    for n in itertools.chain(range(1, 9), [20, 40]):
        for _ in range(60):
            pts = [(rng.randint(0, 4), rng.randint(0, 4)) for _ in range(n)]  # a small grid: ties and repeats
            assert pareto_front(pts) == brute_force(pts), pts
