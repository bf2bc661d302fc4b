"""Scored points of a space and their tables, shared by CMA-ES, MAP and grid searches."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from supermerge.search.backends import Backend
from supermerge.search.evaluator import Scores
from supermerge.search.space import SearchSpace


@dataclass(frozen=True)
class Evaluated:
    """One scored point: its parameter values (the space's dimension order) and scores."""

    values: tuple[float, ...]
    scores: Scores
    generation: int = 0

    @property
    def fitness(self) -> float:
        """The mean of the per-task scores."""
        return self.scores.fitness


def score_points(space: SearchSpace, backend: Backend, units: Sequence[Sequence[float]],
                 generation: int = 0) -> list[Evaluated]:
    """Score points of the unit cube on ``backend``; returns them in order.

    Costs one candidate score per point, spread over the backend's workers.
    """
    candidates = [space.candidate(u) for u in units]
    scores = backend.map(candidates)
    return [Evaluated(c.values, s, generation) for c, s in zip(candidates, scores, strict=True)]


def grid_units(dimensions: int, points: int) -> np.ndarray:
    """Return the full grid with ``points`` evenly spaced values per dimension in [0, 1]
    (``points ** dimensions`` rows, the last dimension varying fastest)."""
    axes = np.meshgrid(*[np.linspace(0.0, 1.0, points)] * dimensions, indexing="ij")
    return np.stack([a.ravel() for a in axes], axis=1)


def best_of(rows: Sequence[Evaluated]) -> Evaluated:
    """Return the row with the highest fitness (the first one on ties)."""
    return max(rows, key=lambda r: r.fitness)


def history_csv(space: SearchSpace, rows: Sequence[Evaluated]) -> str:
    """Return CSV text: generation, one column per dimension, per-task scores, fitness."""
    tasks = list(rows[0].scores.per_task) if rows else []
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["generation", *space.labels, *tasks, "fitness"])
    for row in rows:
        writer.writerow([row.generation, *row.values,
                         *(row.scores.per_task[t] for t in tasks), row.fitness])
    return out.getvalue()
