"""Black-box recipe search: CMA-ES over recipe parameters, MAP Pareto fronts, backends.

Layers inside the package: ``space`` (:class:`SearchSpace`, :class:`Candidate`) ->
``evaluator`` (:class:`Evaluator`: recipes scored on resident weights) -> ``backends``
(local process(es) or Ray actors) -> ``results`` -> ``cmaes`` (:func:`cma_search`) and
``surrogate`` / ``pareto`` -> ``map_front`` (:func:`map_front`). ``toy`` builds a tiny
synthetic problem. The best recipe of a search is a normal recipe mapping: write it as
YAML, or merge it with ``supermerge.merge(result.best_recipe, out)``.
"""

from supermerge.search.backends import Backend, LocalBackend, RayBackend, make_backend
from supermerge.search.cmaes import SearchResult, cma_search
from supermerge.search.errors import SearchError
from supermerge.search.evaluator import (
    Evaluator,
    Metric,
    Scorer,
    ScorerFactory,
    Scores,
    SearchTask,
    accuracy,
)
from supermerge.search.map_front import MapResult, map_front, plot_front
from supermerge.search.pareto import dominates, hypervolume_2d, non_dominated
from supermerge.search.results import Evaluated, best_of, grid_units, history_csv, score_points
from supermerge.search.space import Candidate, Dimension, SearchSpace, load_space
from supermerge.search.surrogate import QuadraticSurrogate, design, quadratic_features

__all__ = [
    "Backend",
    "Candidate",
    "Dimension",
    "Evaluated",
    "Evaluator",
    "LocalBackend",
    "MapResult",
    "Metric",
    "QuadraticSurrogate",
    "RayBackend",
    "Scorer",
    "ScorerFactory",
    "Scores",
    "SearchError",
    "SearchResult",
    "SearchSpace",
    "SearchTask",
    "accuracy",
    "best_of",
    "cma_search",
    "design",
    "dominates",
    "grid_units",
    "history_csv",
    "hypervolume_2d",
    "load_space",
    "make_backend",
    "map_front",
    "non_dominated",
    "plot_front",
    "quadratic_features",
    "score_points",
]
