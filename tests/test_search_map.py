"""MAP: exact quadratic surrogates, Pareto filtering, the front and its re-measured points."""

from __future__ import annotations

import numpy as np
import pytest

from supermerge.search import (
    Candidate,
    LocalBackend,
    QuadraticSurrogate,
    Scores,
    SearchError,
    SearchSpace,
    design,
    hypervolume_2d,
    map_front,
    non_dominated,
    plot_front,
)


def random_quadratic(d: int, rng: np.random.Generator):
    a = rng.normal(size=(d, d))
    b, c = rng.normal(size=d), rng.normal()
    return lambda x: c + x @ b + np.einsum("ni,ij,nj->n", x, a, x)


@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_the_surrogate_recovers_an_exact_quadratic(d):
    rng = np.random.default_rng(d)
    f = random_quadratic(d, rng)
    x = design(d, seed=d)
    surrogate = QuadraticSurrogate.fit(x, f(x))
    probe = rng.random((50, d))
    assert np.allclose(surrogate.predict(probe), f(probe), atol=1e-8)
    assert surrogate.r2 == pytest.approx(1.0)


def test_too_few_or_degenerate_points_are_refused():
    x = np.array([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5], [0.2, 0.2], [0.7, 0.7], [0.9, 0.9]])
    with pytest.raises(SearchError, match="determines only"):
        QuadraticSurrogate.fit(x, x.sum(1))
    with pytest.raises(SearchError, match="cannot fit"):
        QuadraticSurrogate.fit(x[:3], x[:3].sum(1))


def test_pareto_filtering_on_hand_made_points():
    points = np.array([
        [1.0, 0.0],   # front: best first objective
        [0.0, 1.0],   # front: best second objective
        [0.6, 0.6],   # front
        [0.5, 0.5],   # dominated by [0.6, 0.6]
        [0.6, 0.4],   # dominated by [0.6, 0.6] (equal first, worse second)
        [0.6, 0.6],   # a duplicate of a front point: kept
        [-1.0, -1.0],  # dominated by all
    ])
    assert non_dominated(points).tolist() == [0, 1, 2, 5]
    three = np.array([[1, 1, 1], [1, 1, 0], [0, 2, 0], [2, 0, 0], [0, 0, 0]], dtype=float)
    assert non_dominated(three).tolist() == [0, 2, 3]
    assert hypervolume_2d(points, (0.0, 0.0)) == pytest.approx(0.36)
    assert hypervolume_2d(np.array([[1.0, 1.0]]), (0.0, 0.0)) == pytest.approx(1.0)


def test_non_dominated_agrees_with_brute_force():
    rng = np.random.default_rng(0)
    points = rng.integers(0, 4, size=(200, 3)).astype(float)
    brute = [i for i, p in enumerate(points)
             if not any(np.all(q >= p) and np.any(q > p) for q in points)]
    assert non_dominated(points, block=16).tolist() == brute


class TwoQuadratics:
    """Two tasks whose metrics are exact quadratics of the two searched weights."""

    def score(self, candidate: Candidate) -> Scores:
        x, y = (m["weight"] for m in candidate.model_parameters)
        return Scores({"left": 1 - (x - 1) ** 2 - 0.5 * y**2,
                       "right": 1 - x**2 - 0.5 * (y - 1) ** 2 + 0.1 * x * y})


def test_map_front_of_exact_quadratics_is_predicted_exactly(tmp_path):
    space = SearchSpace({"merge_method": "task_arithmetic", "base_model": "base",
                         "models": ["a", "b"]}, {"weight": (0.0, 1.0)})
    result = map_front(space, LocalBackend(TwoQuadratics), checks=4, resolution=21)
    assert len(result.measured) == 9 and result.evaluations == 13
    assert np.allclose(result.check_errors(), 0.0, atol=1e-9)
    assert all(s.r2 == pytest.approx(1.0) for s in result.surrogates.values())
    # the front is non-dominated and spans both extremes of the grid
    assert len(non_dominated(result.front_predicted)) == len(result.front_predicted)
    assert np.all(np.diff(result.front_predicted[:, 0]) >= 0)
    summary = result.to_dict()
    assert summary["checks"][0]["recipe"]["merge_method"] == "task_arithmetic"
    assert plot_front(result, tmp_path / "front.png").stat().st_size > 1000
