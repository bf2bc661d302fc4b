"""Per-tensor parameter values: scalars, gradients over layers, filters."""

import pytest

from supermerge.engine.params import (
    UNSET,
    LayerPositions,
    layer_index,
    resolve,
    resolve_all,
    resolve_layers,
)

NAMES = [
    "model.embed_tokens.weight",
    *(f"model.layers.{i}.self_attn.q_proj.weight" for i in range(5)),
    *(f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)),
    "model.norm.weight",
    "lm_head.weight",
]


def test_layer_index_reads_common_block_names():
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("bert.encoder.layer.3.output.dense.bias") == 3
    assert layer_index("transformer.h.7.attn.c_attn.weight") == 7
    assert layer_index("blocks.0.norm1.weight") == 0
    assert layer_index("model.norm.weight") is None
    assert layer_index("model.layers_norm.weight") is None


def test_positions_span_zero_to_one_and_place_embeddings_first():
    positions = LayerPositions(NAMES)
    assert positions.num_layers == 5
    assert positions.position("model.layers.0.mlp.up_proj.weight") == 0.0
    assert positions.position("model.layers.2.mlp.up_proj.weight") == 0.5
    assert positions.position("model.layers.4.mlp.up_proj.weight") == 1.0
    assert positions.position("model.embed_tokens.weight") == 0.0
    assert positions.position("lm_head.weight") == 1.0


def test_scalar_is_the_same_everywhere():
    assert resolve(0.3, "anything", 0.7) == 0.3
    assert resolve("model", "anything", 0.0) == "model"


def test_gradient_interpolates_linearly():
    # values 0, 1, 0.5 at positions 0, 0.5, 1
    assert resolve([0.0, 1.0, 0.5], "x", 0.0) == 0.0
    assert resolve([0.0, 1.0, 0.5], "x", 0.25) == 0.5
    assert resolve([0.0, 1.0, 0.5], "x", 0.5) == 1.0
    assert resolve([0.0, 1.0, 0.5], "x", 0.75) == 0.75
    assert resolve([0.0, 1.0, 0.5], "x", 1.0) == 0.5
    assert resolve([2.0], "x", 0.9) == 2.0


def test_first_matching_filter_wins_and_default_catches_the_rest():
    spec = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]},
            {"value": 0.5}]
    assert resolve(spec, "model.layers.1.self_attn.q_proj.weight", 0.25) == 0.1
    assert resolve(spec, "model.layers.1.mlp.up_proj.weight", 0.25) == 0.25
    assert resolve(spec, "model.norm.weight", 1.0) == 0.5


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ([], "empty"),
        ([{"filter": "mlp"}], "filter entry"),
        ([1.0, "x"], "all numbers"),
    ],
)
def test_malformed_specs_are_explained(spec, reason):
    with pytest.raises(ValueError, match=reason):
        resolve(spec, "model.norm.weight", 1.0)


def test_resolve_all_turns_bad_specs_into_problems_naming_the_parameter():
    values, problems = resolve_all({"t": [], "weight": 1.0}, "model.norm.weight", 1.0, "parameters")
    assert values == {"weight": 1.0}
    assert len(problems) == 1
    assert "'t'" in problems[0].message and problems[0].tensor == "model.norm.weight"


def test_filters_as_mergekit_reads_them():
    """A star matches everything, a single map is a one-entry list, and a filter list that
    misses the tensor leaves the parameter unset (mergekit falls back, it does not fail)."""
    assert resolve([{"filter": "mlp", "value": 1.0}, {"filter": "*", "value": 2.0}],
                   "model.norm.weight", 1.0) == 2.0
    assert resolve({"filter": "norm", "value": [0.0, 4.0]}, "model.norm.weight", 0.25) == 1.0
    assert resolve([{"filter": "mlp", "value": 1.0}], "model.norm.weight", 1.0) is UNSET
    values, problems = resolve_all({"t": [{"filter": "mlp", "value": 1.0}], "w": 2.0},
                                   "model.norm.weight", 0.0, "parameters")
    assert values == {"w": 2.0} and not problems


def test_lists_of_strings_or_booleans_pick_by_depth():
    # mergekit: the entry at int(t * (n - 1))
    assert [resolve(["a", "b", "c"], "x", t) for t in (0.0, 0.49, 0.5, 0.99, 1.0)] == [
        "a", "a", "b", "b", "c"]
    assert resolve([True, False], "x", 0.9) is True


def test_a_models_own_value_falls_back_to_the_recipes_when_its_filters_miss():
    own = {"density": [{"filter": "mlp", "value": 0.1}]}
    shared = {"density": [{"filter": "self_attn", "value": 0.7}], "weight": 2.0}
    layers = [(own, "models[0].parameters"), (shared, "parameters")]
    assert resolve_layers(layers, "layers.0.mlp.w", 0.0)[0] == {"density": 0.1, "weight": 2.0}
    assert resolve_layers(layers, "layers.0.self_attn.w", 0.0)[0] == {"density": 0.7,
                                                                       "weight": 2.0}
    assert resolve_layers(layers, "norm.w", 0.0)[0] == {"weight": 2.0}  # the method's default
