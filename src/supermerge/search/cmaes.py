"""Evolutionary recipe search with CMA-ES (Akiba et al. 2024, arXiv 2403.13187, parameter space).

CMA-ES (the ``cma`` package) searches the space's unit cube ``[0, 1]^D`` (bounds
handled by ``cma``'s boundary transform), maximising the mean validation metric. Each
generation's population is scored in one batch on a backend (in parallel). After every
generation the whole state (the CMA-ES object with its own seeded random generator, the
history, the best point) is pickled to ``state``; a search started again with the same
space, settings and state file continues where it stopped and makes the same decisions an
uninterrupted run would have made.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from supermerge.progress import Progress
from supermerge.search.backends import Backend
from supermerge.search.errors import SearchError
from supermerge.search.results import Evaluated, best_of, score_points
from supermerge.search.space import SearchSpace

log = logging.getLogger(__name__)

STATE_FORMAT = 1



@dataclass
class SearchResult:
    """What a search found: every scored point, the best one, why it stopped."""

    space: SearchSpace
    history: list[Evaluated]
    stopped: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> Evaluated:
        """The point with the highest fitness (the earliest on ties)."""
        return best_of(self.history)

    @property
    def best_recipe(self) -> dict[str, Any]:
        """The recipe at the best point: a normal recipe mapping (write it as YAML)."""
        return self.space.recipe_at(self.best.values)

    @property
    def evaluations(self) -> int:
        """How many candidates were scored."""
        return len(self.history)


class _Normal:
    """Seeded standard normal samples for ``cma`` (its ``randn`` option); pickles with it."""

    def __init__(self, seed: int) -> None:
        self.generator = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.generator.standard_normal(shape)


def cma_search(
    space: SearchSpace,
    backend: Backend,
    *,
    generations: int = 20,
    popsize: int | None = None,
    sigma0: float = 0.25,
    x0: Sequence[float] | None = None,
    seed: int = 0,
    state: str | Path | None = None,
    progress: Progress | None = None,
) -> SearchResult:
    """Maximise the mean validation metric over ``space`` with CMA-ES; returns the result.

    ``x0`` is the start in parameter values (default: the centre of the bounds),
    ``sigma0`` the initial step in unit-cube coordinates, ``popsize`` the population
    (default: ``cma``'s 4 + 3 ln D; a multiple of the backend's workers keeps them busy).
    Stops after ``generations`` generations, or earlier when the steps have shrunk to
    nothing (``cma``'s tolx; flat fitness does not stop it: accuracies often tie). With
    ``state`` the search resumes from that file if it exists (SearchError if it was saved
    for another space or settings) and saves it after every generation. Costs
    ``popsize`` scores per generation on the backend.
    """
    import cma

    settings = {"popsize": popsize, "sigma0": sigma0, "seed": seed,
                "x0": None if x0 is None else [float(v) for v in x0]}
    saved = _load_state(state, space, settings)
    if saved is not None:
        es, history = saved["es"], saved["history"]
        log.info("resuming the search from %s at generation %d", state, es.countiter)
    else:
        start = np.full(len(space), 0.5) if x0 is None else space.unit(x0)
        # metrics such as accuracy are flat over whole regions: stop on the budget or on
        # vanishing steps (tolx), never because a generation scored alike
        options = {"bounds": [0.0, 1.0], "seed": seed + 1, "randn": _Normal(seed),
                   "verbose": -9, "tolfun": 0, "tolfunhist": 0, "tolflatfitness": 2**31}
        if popsize is not None:
            options["popsize"] = popsize
        es, history = cma.CMAEvolutionStrategy(list(start), sigma0, options), []
    while es.countiter < generations and not es.stop():
        units = es.ask()
        rows = score_points(space, backend, units, generation=es.countiter + 1)
        es.tell(units, [-row.fitness for row in rows])
        history.extend(rows)
        best = best_of(history)
        log.info("generation %d: best fitness %.4f (%s)", es.countiter, best.fitness,
                 _describe(space, best.values))
        _save_state(state, space, settings, es, history)
        if progress is not None:
            progress("search", es.countiter, generations, best.fitness)
    stopped = f"{generations} generations" if es.countiter >= generations else str(es.stop())
    return SearchResult(space, history, stopped, {**settings, "generations": generations,
                                                  "popsize": es.popsize})


def _describe(space: SearchSpace, values: Sequence[float]) -> str:
    return ", ".join(f"{label}={value:.3g}" for label, value in zip(space.labels, values,
                                                                     strict=True))


def _load_state(path: str | Path | None, space: SearchSpace,
                settings: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state at ``path`` if there is one; SearchError if it belongs elsewhere.

    The file is a pickle this module wrote: load only states you saved yourself.
    """
    if path is None or not Path(path).is_file():
        return None
    try:
        with open(path, "rb") as f:
            saved = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as err:
        raise SearchError(f"cannot read the saved search state: {err}", file=path,
                          fix="delete the file to start afresh") from None
    if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
        raise SearchError("the saved search state has an unknown format", file=path,
                          fix="delete the file to start afresh")
    if saved["space"] != space.fingerprint() or saved["settings"] != settings:
        raise SearchError("the saved search state belongs to another space or other settings "
                          "(popsize, sigma0, seed, x0)", file=path,
                          fix="use the same space and settings to resume, or another state "
                          "file (or delete this one) to start afresh")
    return saved


def _save_state(path: str | Path | None, space: SearchSpace, settings: dict[str, Any],
                es: Any, history: list[Evaluated]) -> None:
    """Write the state atomically (a temporary sibling renamed over the old state)."""
    if path is None:
        return
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = {"format": STATE_FORMAT, "space": space.fingerprint(), "settings": settings,
               "es": es, "history": history}
    with open(temporary, "wb") as f:
        pickle.dump(payload, f)
    os.replace(temporary, path)
