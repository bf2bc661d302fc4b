"""Search spaces: dimensions, the recipe at a point, and clear errors for bad spaces."""

from __future__ import annotations

import numpy as np
import pytest

from supermerge.errors import MethodError, RecipeError
from supermerge.search import SearchSpace, load_space

RECIPE = {"merge_method": "ties", "base_model": "base", "models": ["a", {"model": "b"}],
          "parameters": {"lambda": 1.0, "density": 0.5}, "dtype": "float32"}


def test_dimensions_cover_each_model_and_layer_group():
    space = SearchSpace(RECIPE, {"weight": [0.0, 2.0], "lambda": (0.5, 1.5)}, layer_groups=2)
    assert space.labels == ["weight[a]@0", "weight[a]@1", "weight[b]@0", "weight[b]@1",
                            "lambda@0", "lambda@1"]
    assert np.allclose(space.values([0, 0.5, 1, 0.25, 0, 1]), [0, 1, 2, 0.5, 0.5, 1.5])
    assert np.allclose(space.unit(space.values([0.1] * 6)), 0.1)


def test_recipe_at_a_point_is_a_normal_recipe_with_gradients():
    space = SearchSpace(RECIPE, {"weight": [0.0, 1.0], "lambda": [0.0, 2.0]}, layer_groups=2)
    recipe = space.recipe_at([0.1, 0.2, 0.3, 0.4, 1.0, 2.0])
    assert recipe["models"] == [{"model": "a", "parameters": {"weight": [0.1, 0.2]}},
                                {"model": "b", "parameters": {"weight": [0.3, 0.4]}}]
    assert recipe["parameters"] == {"lambda": [1.0, 2.0], "density": 0.5}
    assert recipe["dtype"] == "float32"
    assert RECIPE["models"] == ["a", {"model": "b"}]  # the space's recipe is not touched


def test_candidate_splits_global_and_per_model_parameters():
    space = SearchSpace(RECIPE, {"weight": [0.0, 1.0]})
    candidate = space.candidate([0.25, 0.75])
    assert candidate.method == "ties"
    assert candidate.parameters == {"lambda": 1.0}
    assert candidate.model_parameters == [{"density": 0.5, "weight": 0.25},
                                          {"density": 0.5, "weight": 0.75}]
    assert candidate.values == (0.25, 0.75)


def test_a_searched_per_model_value_beats_the_recipe_default():
    space = SearchSpace(RECIPE, {"density": [0.1, 0.9]})
    recipe = space.recipe_at([0.2, 0.3])
    assert "density" not in recipe["parameters"]
    assert [m["parameters"]["density"] for m in recipe["models"]] == [0.2, 0.3]


@pytest.mark.parametrize("bounds, match", [
    ({"weight": [1.0, 1.0]}, "empty"),
    ({"weight": [1.0, 0.0]}, "empty"),
    ({"weight": [0.0, float("inf")]}, "not finite"),
    ({"weight": [0.0]}, r"\[low, high\]"),
    ({"weight": "wide"}, r"\[low, high\]"),
    ({}, "empty: no parameter"),
])
def test_bad_bounds_are_clear_errors(bounds, match):
    with pytest.raises(RecipeError, match=match) as err:
        SearchSpace(RECIPE, bounds)
    assert err.value.fix


def test_unknown_parameter_lists_the_valid_ones():
    with pytest.raises(RecipeError, match="unknown parameter.*'densty'") as err:
        SearchSpace(RECIPE, {"densty": [0.1, 0.9]})
    assert "density" in err.value.fix and "weight" in err.value.fix


def test_bounds_the_method_refuses_are_method_errors():
    with pytest.raises(MethodError, match="density"):
        SearchSpace(RECIPE, {"density": [0.1, 1.5]})


@pytest.mark.parametrize("recipe, match", [
    ({**RECIPE, "merge_method": "nope"}, "unknown merge method"),
    ({**RECIPE, "merge_method": "tall_masks"}, "needs task id data"),
    ({**RECIPE, "models": []}, "no models"),
    ({**RECIPE, "models": ["a", "base"]}, "is the base model"),
    ({**RECIPE, "base_model": None}, "needs a base_model"),
])
def test_bad_recipes_are_clear_errors(recipe, match):
    with pytest.raises((RecipeError, MethodError), match=match):
        SearchSpace(recipe, {"weight": [0, 1]})


def test_layer_groups_must_be_positive():
    with pytest.raises(RecipeError, match="layer_groups"):
        SearchSpace(RECIPE, {"weight": [0, 1]}, layer_groups=0)


def test_space_file_with_search_block(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("merge_method: task_arithmetic\nbase_model: base\nmodels: [a, b]\n"
                    "search:\n  parameters: {weight: [0, 1]}\n  tasks: [x, y]\n")
    space, settings = load_space(path)
    assert len(space) == 2 and settings == {"tasks": ["x", "y"]}
    path.write_text("merge_method: task_arithmetic\nmodels: [a]\nsearch: {weights: 1}\n")
    with pytest.raises(RecipeError, match="unknown key.*'weights'"):
        load_space(path)
    path.write_text("merge_method: task_arithmetic\nmodels: [a]\n")
    with pytest.raises(RecipeError, match="no `search:` block"):
        load_space(path)


def test_fingerprint_changes_with_the_bounds():
    a = SearchSpace(RECIPE, {"weight": [0.0, 1.0]})
    b = SearchSpace(RECIPE, {"weight": [0.0, 2.0]})
    assert a.fingerprint() == SearchSpace(RECIPE, {"weight": [0.0, 1.0]}).fingerprint()
    assert a.fingerprint() != b.fingerprint()
