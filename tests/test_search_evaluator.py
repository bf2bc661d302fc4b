"""The Evaluator scores recipes on resident weights exactly as the engine would merge them."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import supermerge
from supermerge.errors import RecipeError
from supermerge.io import open_checkpoint
from supermerge.learn import CheckpointState, TaskData
from supermerge.search import Evaluator, SearchSpace, SearchTask
from supermerge.search.toy import toy_problem


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    """The toy problem's base and experts written as safetensors files."""
    folder = tmp_path_factory.mktemp("toy")
    module, experts, tasks = toy_problem(3, seed=1)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()},
              folder / "base.safetensors")
    for name, state in experts.items():
        save_file({k: v.contiguous() for k, v in state.items()}, folder / f"{name}.safetensors")
    return folder, module, tasks


def toy_evaluator(folder, module, tasks) -> Evaluator:
    """An Evaluator over the toy files' three experts."""
    with ExitStack() as stack:
        experts = {name: CheckpointState(stack.enter_context(
            open_checkpoint(folder / f"{name}.safetensors"))) for name in ("task0", "task1",
                                                                         "task2")}
        return Evaluator(module, module.state_dict(), experts, tasks)


@pytest.mark.parametrize("method, bounds, groups, parameters", [
    ("task_arithmetic", {"weight": (-0.5, 1.5), "lambda": (0.5, 1.5)}, 2, {}),
    ("task_arithmetic", {"weight": (0.2, 1.5)}, 1, {"normalize": True}),  # linear fast path
    ("linear", {"weight": (0.1, 1.0)}, 1, {}),
    ("ties", {"weight": (0.1, 1.0), "density": (0.2, 0.9)}, 2, {}),
    ("dare_ties", {"density": (0.3, 0.9)}, 1, {}),
])
def test_scored_weights_equal_the_engine_merge_of_the_recipe(toy_files, tmp_path, method,
                                                             bounds, groups, parameters):
    folder, evaluator = toy_files[0], toy_evaluator(*toy_files)
    recipe = {"merge_method": method, "base_model": str(folder / "base.safetensors"),
              "models": [str(folder / f"task{i}.safetensors") for i in range(3)], "seed": 7,
              "parameters": parameters}
    space = SearchSpace(recipe, bounds, layer_groups=groups)
    unit = torch.linspace(0.1, 0.9, len(space)).tolist()
    scored = evaluator.merged_weights(space.candidate(unit))
    supermerge.merge(space.recipe_at(space.values(unit)), tmp_path / "out")
    merged = open_checkpoint(tmp_path / "out")
    assert set(scored) == set(merged.names())
    for name, tensor in scored.items():
        torch.testing.assert_close(tensor, merged.read(name), rtol=1e-5, atol=1e-6)


def test_scores_come_from_resident_weights_and_each_task_head(tmp_path):
    torch.manual_seed(0)
    body = nn.Linear(4, 4)
    base = {k: v.detach().clone() for k, v in body.state_dict().items()}
    expert = {k: v + 0.1 for k, v in base.items()}
    path = tmp_path / "expert.safetensors"
    save_file(expert, path)
    inputs = torch.randn(10, 4)
    heads = {"a": nn.Linear(4, 2), "b": nn.Linear(4, 3)}
    tasks = [SearchTask(name, TaskData(inputs, heads[name](body(inputs)).argmax(-1)),
                        batch_size=3) for name in heads]
    with open_checkpoint(path) as checkpoint:
        evaluator = Evaluator(body, body.state_dict(), {"e": CheckpointState(checkpoint)},
                              tasks, heads=heads)
    path.unlink()  # the evaluator never reads the expert again
    recipe = {"merge_method": "task_arithmetic", "base_model": "base", "models": ["e"]}
    space = SearchSpace(recipe, {"weight": (0.0, 1.0)})
    at_base = evaluator.score(space.candidate([0.0]))
    assert at_base.per_task == {"a": 1.0, "b": 1.0}  # labels are the base's predictions
    assert at_base.fitness == 1.0
    assert evaluator.score(space.candidate([1.0])).fitness <= 1.0


def test_a_candidate_for_other_experts_is_refused():
    module, experts, tasks = toy_problem(2)
    evaluator = Evaluator(module, module.state_dict(), experts, tasks)
    space = SearchSpace({"merge_method": "task_arithmetic", "base_model": "b",
                         "models": ["x", "y", "z"]}, {"weight": (0, 1)})
    with pytest.raises(RecipeError, match="3 models in the candidate, 2 experts"):
        evaluator.score(space.candidate([0.5] * 3))


def test_a_models_filter_that_misses_falls_back_to_the_recipes_value(toy_files, tmp_path):
    """mergekit's lookup, as the engine does it: a model's own filter list that matches no
    entry for a tensor leaves the recipe's `parameters` value in force there."""
    from supermerge.search.space import Candidate

    folder, evaluator = toy_files[0], toy_evaluator(*toy_files)
    own = [{"weight": [{"filter": "layers.0", "value": 2.0}]}, {}, {}]
    candidate = Candidate("task_arithmetic", {"weight": 0.25, "lambda": 1.0}, own)
    scored = evaluator.merged_weights(candidate)
    supermerge.merge({"merge_method": "task_arithmetic",
                      "base_model": str(folder / "base.safetensors"),
                      "models": [{"model": str(folder / f"task{i}.safetensors"),
                                  "parameters": own[i]} for i in range(3)],
                      "parameters": {"weight": 0.25, "lambda": 1.0}}, tmp_path / "out")
    merged = open_checkpoint(tmp_path / "out")
    for name, tensor in scored.items():  # layers.1: task0 at 0.25, not at the default 1.0
        torch.testing.assert_close(tensor, merged.read(name), rtol=1e-5, atol=1e-6)
