"""MAP: Pareto fronts of merges from quadratic surrogates (Li et al. 2024, arXiv 2406.07529).

1. Measure every task's metric at the designed points of the space (:func:`design`).
2. Fit one quadratic surrogate per task by least squares.
3. Predict every task on a fine grid of the unit cube (up to 3 dimensions) or on a dense
   quasi-random sample (beyond), and keep the non-dominated predictions: the front.
4. Re-measure a few front points, spread along it, to show how far to trust it.

With the default space (``task_arithmetic``, one weight per model) the dimensions are
the paper's per-task scaling coefficients.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from supermerge.search.backends import Backend
from supermerge.search.errors import SearchError
from supermerge.search.pareto import non_dominated
from supermerge.search.results import Evaluated, grid_units, score_points
from supermerge.search.space import SearchSpace
from supermerge.search.surrogate import QuadraticSurrogate, design

log = logging.getLogger(__name__)


@dataclass
class MapResult:
    """The design, the surrogates, the predicted front and the re-measured front points.

    ``front_units`` [F, D] are the front's points in the unit cube, ``front_predicted``
    [F, T] their predicted metrics (tasks in ``tasks`` order), sorted by the first task;
    ``checks`` the re-measured front points and ``check_predicted`` [C, T] what the
    surrogates predicted for them.
    """

    space: SearchSpace
    tasks: list[str]
    measured: list[Evaluated]
    surrogates: dict[str, QuadraticSurrogate]
    front_units: np.ndarray
    front_predicted: np.ndarray
    checks: list[Evaluated]
    check_predicted: np.ndarray

    @property
    def evaluations(self) -> int:
        """How many candidates were scored (design and checks)."""
        return len(self.measured) + len(self.checks)

    def check_errors(self) -> np.ndarray:
        """Return [C, T] measured minus predicted metrics of the re-measured front points."""
        measured = np.array([[c.scores.per_task[t] for t in self.tasks] for c in self.checks])
        return measured - self.check_predicted

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary: surrogates (coefficients, R²), front, checks."""
        labels = self.space.labels
        return {
            "tasks": self.tasks,
            "dimensions": labels,
            "evaluations": self.evaluations,
            "surrogates": {t: {"coefficients": s.coefficients.tolist(), "r2": s.r2}
                           for t, s in self.surrogates.items()},
            "front": [{"values": dict(zip(labels, self.space.values(u).tolist(), strict=True)),
                       "predicted": dict(zip(self.tasks, p.tolist(), strict=True))}
                      for u, p in zip(self.front_units, self.front_predicted, strict=True)],
            "checks": [{"values": dict(zip(labels, c.values, strict=True)),
                        "predicted": dict(zip(self.tasks, p.tolist(), strict=True)),
                        "measured": c.scores.per_task,
                        "recipe": self.space.recipe_at(c.values)}
                       for c, p in zip(self.checks, self.check_predicted, strict=True)],
        }


def map_front(
    space: SearchSpace,
    backend: Backend,
    *,
    points: int | None = None,
    resolution: int | None = None,
    samples: int = 20_000,
    checks: int = 5,
    seed: int = 0,
) -> MapResult:
    """Run MAP over ``space``; returns the surrogates, the front and its re-measured points.

    ``points`` sets the design size beyond the default (see :func:`design`);
    ``resolution`` the grid points per dimension (default 101 for up to 2 dimensions, 21
    for 3); beyond 3 dimensions ``samples`` Sobol points replace the grid. Costs the
    design's scores plus ``checks`` more on the backend, and cheap surrogate predictions.
    Raises SearchError if the design cannot determine the quadratics.
    """
    d = len(space)
    units = design(d, points=points, seed=seed)
    measured = score_points(space, backend, units)
    tasks = list(measured[0].scores.per_task)
    if len(tasks) < 2:
        raise SearchError("a Pareto front needs at least 2 tasks",
                          fix="score on two tasks or more, or run the CMA-ES search")
    surrogates = {
        t: QuadraticSurrogate.fit(units, np.array([m.scores.per_task[t] for m in measured]))
        for t in tasks}
    for t, s in surrogates.items():
        log.info("surrogate of %s: R² %.3f on %d design points", t, s.r2, len(units))
    dense = _dense_units(d, resolution, samples, seed)
    predicted = np.stack([surrogates[t].predict(dense) for t in tasks], axis=1)
    front = non_dominated(predicted)
    front = front[np.argsort(predicted[front, 0], kind="stable")]
    chosen = front[np.unique(np.linspace(0, len(front) - 1, min(checks, len(front))).round()
                             .astype(int))]
    remeasured = score_points(space, backend, dense[chosen])
    return MapResult(space, tasks, measured, surrogates, dense[front], predicted[front],
                     remeasured, predicted[chosen])


def _dense_units(dimensions: int, resolution: int | None, samples: int, seed: int
                 ) -> np.ndarray:
    """The points the surrogates are predicted on: a grid up to 3 dimensions, else Sobol."""
    if dimensions <= 3:
        return grid_units(dimensions, resolution or (101 if dimensions <= 2 else 21))
    sobol = torch.quasirandom.SobolEngine(dimensions, scramble=True, seed=seed)
    return sobol.draw(samples).double().numpy()


def plot_front(result: MapResult, path: str | Path) -> Path:
    """Draw the front of a 2-task MAP result into a PNG; returns its path.

    Shows the measured design points, the predicted front, and each re-measured front
    point joined to its prediction. Raises SearchError for other than 2 tasks.
    """
    if len(result.tasks) != 2:
        raise SearchError(f"the front plot shows 2 tasks, the result has {len(result.tasks)}",
                          fix="read the front from map.json instead")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    first, second = result.tasks
    figure = Figure(figsize=(6, 5), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    designed = np.array([[m.scores.per_task[first], m.scores.per_task[second]]
                       for m in result.measured])
    ax.scatter(designed[:, 0], designed[:, 1], s=18, c="0.6", label="design points (measured)")
    ax.plot(result.front_predicted[:, 0], result.front_predicted[:, 1], "-", c="tab:blue",
            label="front (predicted)")
    measured = np.array([[c.scores.per_task[first], c.scores.per_task[second]]
                         for c in result.checks])
    for p, m in zip(result.check_predicted, measured, strict=True):
        ax.plot([p[0], m[0]], [p[1], m[1]], ":", c="tab:red", lw=1)
    ax.scatter(result.check_predicted[:, 0], result.check_predicted[:, 1], s=40,
               facecolors="none", edgecolors="tab:blue", label="front points (predicted)")
    ax.scatter(measured[:, 0], measured[:, 1], s=40, c="tab:red",
               label="front points (re-measured)")
    ax.set_xlabel(first)
    ax.set_ylabel(second)
    ax.set_title("MAP: predicted Pareto front and re-measured points")
    ax.legend(fontsize=8)
    figure.savefig(path, dpi=100)
    return Path(path)
