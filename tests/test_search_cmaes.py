"""CMA-ES recipe search: finds a known optimum, resumes exactly, refuses foreign states."""

from __future__ import annotations

import numpy as np
import pytest

from supermerge.search import (
    Candidate,
    LocalBackend,
    Scores,
    SearchError,
    SearchSpace,
    cma_search,
    history_csv,
)

RECIPE = {"merge_method": "task_arithmetic", "base_model": "base", "models": ["a", "b", "c"]}
OPTIMUM = np.array([0.2, 1.3, -0.4])


class Quadratic:
    """Fitness 1 - |x - OPTIMUM|² over the searched weights, split over two 'tasks'."""

    def __init__(self) -> None:
        self.calls = 0

    def score(self, candidate: Candidate) -> Scores:
        self.calls += 1
        weights = np.array([m["weight"] for m in candidate.model_parameters])
        loss = float(np.sum((weights - OPTIMUM) ** 2))
        return Scores({"first": 1.0 - loss, "second": 1.0 - loss})


def space() -> SearchSpace:
    return SearchSpace(RECIPE, {"weight": (-1.0, 2.0)})


def test_cma_es_finds_the_optimum_of_a_quadratic():
    scorer = Quadratic()
    result = cma_search(space(), LocalBackend(lambda: scorer), generations=40, popsize=8,
                        seed=3)
    assert np.allclose(result.best.values, OPTIMUM, atol=2e-3)
    assert result.best.fitness == pytest.approx(1.0, abs=1e-5)
    assert result.evaluations == scorer.calls == 8 * 40
    weights = [m["parameters"]["weight"] for m in result.best_recipe["models"]]
    assert np.allclose(weights, OPTIMUM, atol=2e-3)
    assert history_csv(result.space, result.history).splitlines()[0] == (
        "generation,weight[a],weight[b],weight[c],first,second,fitness")


def test_a_resumed_search_equals_an_uninterrupted_one(tmp_path):
    state = tmp_path / "state.pkl"
    straight = cma_search(space(), LocalBackend(Quadratic), generations=6, popsize=5, seed=1)
    first = cma_search(space(), LocalBackend(Quadratic), generations=3, popsize=5, seed=1,
                       state=state)
    assert first.evaluations == 15 and state.is_file()
    resumed = cma_search(space(), LocalBackend(Quadratic), generations=6, popsize=5, seed=1,
                         state=state)
    assert [r.values for r in resumed.history] == [r.values for r in straight.history]
    assert resumed.best == straight.best


def test_the_seed_decides_the_search():
    runs = [cma_search(space(), LocalBackend(Quadratic), generations=2, popsize=4, seed=s)
            for s in (5, 5, 6)]
    assert runs[0].history == runs[1].history
    assert runs[0].history != runs[2].history


def test_a_state_saved_for_another_space_or_settings_is_refused(tmp_path):
    state = tmp_path / "state.pkl"
    cma_search(space(), LocalBackend(Quadratic), generations=1, popsize=4, state=state)
    other = SearchSpace(RECIPE, {"weight": (-1.0, 3.0)})
    with pytest.raises(SearchError, match="another space"):
        cma_search(other, LocalBackend(Quadratic), generations=2, popsize=4, state=state)
    with pytest.raises(SearchError, match="other settings"):
        cma_search(space(), LocalBackend(Quadratic), generations=2, popsize=6, state=state)
    state.write_bytes(b"not a pickle")
    with pytest.raises(SearchError, match="cannot read"):
        cma_search(space(), LocalBackend(Quadratic), generations=2, popsize=4, state=state)
