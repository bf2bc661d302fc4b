"""Backends: a process pool and Ray actors make the same search as in-process scoring."""

from __future__ import annotations

from functools import partial

import pytest

from supermerge.errors import MethodError
from supermerge.search import LocalBackend, RayBackend, cma_search, make_backend, map_front
from supermerge.search.toy import toy_evaluator, toy_space

FACTORY = partial(toy_evaluator, 2, seed=0)


@pytest.fixture(scope="module")
def ray_backend():
    """One local Ray instance (2 CPUs) with 2 actors for the whole module: Ray starts slowly."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    backend = RayBackend(FACTORY, actors=2)
    yield backend
    backend.close()
    ray.shutdown()


def search(backend):
    return cma_search(toy_space(2), backend, generations=3, popsize=4, seed=0)


@pytest.fixture(scope="module")
def in_process():
    return search(LocalBackend(FACTORY))


def test_ray_and_local_backends_make_the_same_search(ray_backend, in_process):
    on_ray = search(ray_backend)
    assert on_ray.history == in_process.history
    assert on_ray.best_recipe == in_process.best_recipe
    assert map_front(toy_space(2), ray_backend, checks=2).to_dict() == map_front(
        toy_space(2), LocalBackend(FACTORY), checks=2).to_dict()


def test_ray_errors_come_back_as_supermerge_errors(ray_backend):
    bad = toy_space(2, method="linear", bounds={"weight": (-1.0, 1.0)})
    with pytest.raises(MethodError, match="sum to 0"):
        ray_backend.map([bad.candidate([0.5, 0.5])])


def test_a_process_pool_makes_the_same_search(in_process):
    with make_backend("local", FACTORY, workers=2) as pool:
        assert search(pool).history == in_process.history
