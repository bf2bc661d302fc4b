"""Pareto fronts of points scored on several objectives (higher is better on each)."""

from __future__ import annotations

import numpy as np


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """True if ``a`` is at least as good as ``b`` everywhere and better somewhere."""
    return bool(np.all(a >= b) and np.any(a > b))


def non_dominated(points: np.ndarray, block: int = 256) -> np.ndarray:
    """Return the indices of the points no other point dominates, in input order.

    ``points`` is [N, M] (M objectives, maximised). Equal points are all kept. A point can
    only be dominated by one that comes before it in descending lexicographic order, so
    points are visited in that order, ``block`` at a time, each block compared with the
    front found so far and with itself. Costs O(N x front size x M) comparisons,
    vectorised; memory O(block x front size x M).
    """
    points = np.asarray(points, dtype=float)
    if points.ndim != 2:
        raise ValueError(f"points must be [N, M], got shape {points.shape}")
    order = np.lexsort(tuple(-points[:, m] for m in reversed(range(points.shape[1]))))
    front = np.empty((0, points.shape[1]))
    kept: list[np.ndarray] = []
    for start in range(0, len(order), block):
        index = order[start:start + block]
        chunk = points[index]
        earlier = _dominance(front, chunk).any(axis=1)
        inside = np.tril(_dominance(chunk, chunk), k=-1).any(axis=1)
        keep = ~(earlier | inside)
        front = np.vstack([front, chunk[keep]])
        kept.append(index[keep])
    return np.sort(np.concatenate(kept)) if kept else np.empty(0, dtype=int)


def _dominance(by: np.ndarray, points: np.ndarray) -> np.ndarray:
    """[len(points), len(by)] booleans: does ``by[j]`` dominate ``points[i]``?"""
    at_least = np.ones((len(points), len(by)), dtype=bool)
    better = np.zeros_like(at_least)
    for m in range(points.shape[1]):  # one 2-D comparison per objective: fast in numpy
        mine, theirs = points[:, m, None], by[None, :, m]
        at_least &= theirs >= mine
        better |= theirs > mine
    return at_least & better


def hypervolume_2d(points: np.ndarray, reference: tuple[float, float]) -> float:
    """Return the area dominated by 2-objective ``points`` and bounded below by ``reference``.

    Points not better than the reference in both objectives add nothing. Costs O(N log N).
    """
    points = np.asarray(points, dtype=float).reshape(-1, 2)
    points = points[np.all(points > np.asarray(reference), axis=1)]
    if len(points) == 0:
        return 0.0
    front = points[non_dominated(points)]
    front = front[np.argsort(-front[:, 0])]
    area, height = 0.0, reference[1]
    for x, y in front:
        if y > height:
            area += (x - reference[0]) * (y - height)
            height = y
    return float(area)
