"""The Pareto frontier of a set of (x, y) points where lower is better on both axes.

A point is on the frontier when no other point is at least as good on both axes and strictly
better on one. Two identical points do not dominate each other, so duplicates of a frontier
point are all on it (a sweep may hold two recipes that land on the same numbers; both are
labelled). A point with the same x as a frontier point and a larger y is dominated, and so is
one with the same y and a larger x. For "higher is better" on an axis, negate it first.
"""

from __future__ import annotations

import math
from typing import Sequence

from slimlm.errors import SlimlmError


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points, ordered by x then y (the order to draw the line in)."""
    for i, (x, y) in enumerate(points):
        if not (math.isfinite(x) and math.isfinite(y)):
            raise SlimlmError(f"point {i} is ({x}, {y}); a Pareto frontier needs finite numbers: leave it out")
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    front: list[int] = []
    best_y = math.inf
    for i in order:
        x, y = points[i]
        # sorted by x: every point before this one has x <= this x, so it is dominated unless its y is
        # lower than all of theirs, or it repeats the last frontier point exactly
        if y < best_y or (front and tuple(points[front[-1]]) == (x, y)):
            front.append(i)
            best_y = min(best_y, y)
    return front
