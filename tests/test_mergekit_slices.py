"""mergekit's ``slices:`` (issue 17, item 1): each output slice merges its sources' layers
position by position, slices stack with their layers renumbered, the config's layer count
follows. Oracles by hand on tiny Llama, GPT-2, BERT and Qwen2 models built here."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

import supermerge
from helpers_hf import loads_and_generates, save, tiny_causal_lm, weights
from supermerge.errors import PlanError, RecipeError

transformers = pytest.importorskip("transformers")

LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """Two unrelated 4-block Llamas (a, b) and their tensors."""
    root = tmp_path_factory.mktemp("llamas")
    paths = {name: save(tiny_causal_lm("llama", seed), root / name)
             for name, seed in (("a", 0), ("b", 1))}
    return paths, {name: weights(path) for name, path in paths.items()}


def sliced(sources_per_slice, method="passthrough", **extra) -> dict:
    """A recipe of one slice per entry, each a list of (path, start, end)."""
    return {"merge_method": method, "slices": [
        {"sources": [{"model": str(p), "layer_range": [a, b]} for p, a, b in sources]}
        for sources in sources_per_slice], **extra}


def layer(state: dict, index: int) -> dict[str, torch.Tensor]:
    """The tensors of block ``index`` of a Llama state dict, by their name within it."""
    return {m.group(2): t for n, t in state.items()
            if (m := LAYER.match(n)) and int(m.group(1)) == index}


# -- passthrough stacking: copies, renumbering, layer count -------------------------------


def test_stacked_slices_are_bit_identical_copies_renumbered(llamas, tmp_path):
    paths, states = llamas
    out = tmp_path / "stack"
    supermerge.merge(sliced([[(paths["a"], 0, 3)], [(paths["b"], 1, 4)]]), out)
    got = weights(out)
    for index, (model, source) in enumerate([("a", 0), ("a", 1), ("a", 2),
                                             ("b", 1), ("b", 2), ("b", 3)]):
        mine, theirs = layer(got, index), layer(states[model], source)
        assert mine.keys() == theirs.keys() and len(mine) == 9
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), (index, model, source)
    assert not layer(got, 6)
    # embeddings with the first slice, final norm and head with the last (mergekit's rule)
    assert torch.equal(got["model.embed_tokens.weight"], states["a"]["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], states["b"]["lm_head.weight"])
    assert torch.equal(got["model.norm.weight"], states["b"]["model.norm.weight"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    model = loads_and_generates(out)
    assert len(model.model.layers) == 6


def test_depth_up_scaling_repeats_layers(llamas, tmp_path):
    """SOLAR's depth up-scaling: two overlapping copies of one model, 4 + 4 -> 6 layers."""
    paths, states = llamas
    out = tmp_path / "dus"
    supermerge.merge(sliced([[(paths["a"], 0, 3)], [(paths["a"], 1, 4)]], dtype="bfloat16"),
                     out)
    got = weights(out)
    for index, source in enumerate([0, 1, 2, 1, 2, 3]):
        mine, theirs = layer(got, index), layer(states["a"], source)
        assert all(torch.equal(mine[k], theirs[k].bfloat16()) for k in mine)
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["dtype"]) == (6, "bfloat16")
    loads_and_generates(out)


def test_gpt2_stack_doubles_n_layer(tmp_path):
    """mergekit's test_gpt2_stack: the same 3 blocks twice; n_layer 6, h.N renumbered."""
    source = save(tiny_causal_lm("gpt2", 0, layers=3), tmp_path / "gpt2")
    out = tmp_path / "stack"
    supermerge.merge(sliced([[(source, 0, 3)]] * 2, dtype="bfloat16"), out)
    state, got = weights(source), weights(out)
    for index in range(6):
        for name, tensor in state.items():
            if name.startswith(f"transformer.h.{index % 3}."):
                renamed = name.replace(f"h.{index % 3}.", f"h.{index}.", 1)
                assert torch.equal(got[renamed], tensor.bfloat16()), renamed
    assert torch.equal(got["transformer.wte.weight"], state["transformer.wte.weight"].bfloat16())
    assert json.loads((out / "config.json").read_text())["n_layer"] == 6
    assert transformers.AutoConfig.from_pretrained(out).n_layer == 6
    loads_and_generates(out)


def test_bert_encoder_layers_slice(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=4,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=16)
    source = save(transformers.BertModel(config), tmp_path / "bert")
    out = tmp_path / "top"
    supermerge.merge(sliced([[(source, 2, 4)]]), out)
    state, got = weights(source), weights(out)
    prefix = next(n for n in state if ".layer.3." in n).split(".layer.3.")[0]
    for name, tensor in state.items():
        if f"{prefix}.layer.3." in name:
            assert torch.equal(got[name.replace(".layer.3.", ".layer.1.")], tensor)
    assert not any(".layer.2." in n for n in got)
    model = transformers.AutoModel.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).last_hidden_state).all()


def test_per_layer_config_lists_follow_their_layers(tmp_path):
    """Qwen2's layer_types has one entry per block: each output block keeps its source's."""
    model = tiny_causal_lm("qwen2", 0)
    model.config.layer_types = ["full_attention", "sliding_attention"] * 2
    model.config.use_sliding_window, model.config.sliding_window = True, 8
    source = save(model, tmp_path / "qwen")
    out = tmp_path / "out"
    supermerge.merge(sliced([[(source, 1, 4)], [(source, 0, 1)]]), out)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    assert config["layer_types"] == ["sliding_attention", "full_attention",
                                     "sliding_attention", "full_attention"]
    loads_and_generates(out)


# -- merges within a slice: gradients per slice, parameter lookup -------------------------


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """SLERP from a to b by hand in float64 (lerp where they are nearly parallel)."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = float(a64 @ b64 / (a64.norm() * b64.norm()))
    if abs(cos) > 1 - 1e-8:
        return torch.lerp(a.double(), b.double(), t).float()
    theta = math.acos(cos)
    return ((math.sin((1 - t) * theta) * a.double() + math.sin(t * theta) * b.double())
            / math.sin(theta)).float()


GRADIENT_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
              {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
              {"value": 0.5}]
# the gradients at depths 0, 1/3, 2/3, 1 (four layers), interpolated by hand
ATTN_T = [0.0, 0.5 + (0.3 - 0.5) / 3, 0.3 + (0.7 - 0.3) * 2 / 3, 1.0]
MLP_T = [1.0, 0.5 + (0.7 - 0.5) / 3, 0.7 + (0.3 - 0.7) * 2 / 3, 0.0]


def test_gradient_slerp_interpolates_t_across_the_slice(llamas, tmp_path):
    """mergekit's gradient-slerp example: t from the filter's gradient at each layer's
    depth, 0.5 elsewhere; t = 0 is the base model."""
    paths, states = llamas
    out = tmp_path / "slerp"
    recipe = sliced([[(paths["a"], 0, 4), (paths["b"], 0, 4)]], "slerp",
                    base_model=str(paths["a"]), parameters={"t": GRADIENT_T})
    supermerge.merge(recipe, out)
    got = weights(out)
    for index in range(4):
        mine, a, b = layer(got, index), layer(states["a"], index), layer(states["b"], index)
        for name in mine:
            t = (ATTN_T if "self_attn" in name else MLP_T if "mlp" in name else [0.5] * 4)[index]
            torch.testing.assert_close(mine[name], slerp(a[name], b[name], t),
                                       rtol=1e-5, atol=1e-6, msg=f"{index} {name}")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(got[name], slerp(states["a"][name], states["b"][name], 0.5),
                                   rtol=1e-5, atol=1e-6)
    loads_and_generates(out)


def test_each_slice_has_its_own_gradient_and_sources(llamas, tmp_path):
    """Two slices, each t: [0, 1] over its own two layers; the second slice swaps which
    model is the base (its `base_model`) and takes b's layers 2-3 against a's 0-1."""
    paths, states = llamas
    a, b = str(paths["a"]), str(paths["b"])
    recipe = {"merge_method": "slerp", "base_model": a, "parameters": {"t": [0, 1]}, "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}]},
        {"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [2, 4]}],
         "base_model": b}]}
    out = tmp_path / "two"
    supermerge.merge(recipe, out)
    got = weights(out)
    expected = [layer(states["a"], 0), layer(states["b"], 1),  # slice 0: t = 0, then t = 1
                layer(states["b"], 2), layer(states["a"], 1)]  # slice 1: base b first
    for index, want in enumerate(expected):
        mine = layer(got, index)
        for name in mine:
            torch.testing.assert_close(mine[name], want[name], rtol=1e-6, atol=1e-6)


def test_parameters_come_from_the_source_then_the_slice_then_the_recipe(llamas, tmp_path):
    """mergekit's lookup: a source's own weight, else its slice's, else the recipe's."""
    paths, states = llamas
    a, b = str(paths["a"]), str(paths["b"])
    recipe = {"merge_method": "linear", "parameters": {"weight": 5.0}, "slices": [
        {"sources": [{"model": a, "layer_range": [0, 1], "parameters": {"weight": 3.0}},
                     {"model": b, "layer_range": [0, 1]}],
         "parameters": {"weight": 1.0}},
        {"sources": [{"model": a, "layer_range": [1, 2], "parameters": {"weight": 3.0}},
                     {"model": b, "layer_range": [1, 2]}]}]}
    out = tmp_path / "linear"
    supermerge.merge(recipe, out)
    got = weights(out)
    for index, (wa, wb) in enumerate([(3.0, 1.0), (3.0, 5.0)]):
        mine, la, lb = layer(got, index), layer(states["a"], index), layer(states["b"], index)
        for name in mine:
            torch.testing.assert_close(mine[name], (wa * la[name] + wb * lb[name]) / (wa + wb))
    # the embedding follows the first slice's parameters, the head the last's
    e = "model.embed_tokens.weight"
    torch.testing.assert_close(got[e], (3 * states["a"][e] + states["b"][e]) / 4)
    h = "lm_head.weight"
    torch.testing.assert_close(got[h], (3 * states["a"][h] + 5 * states["b"][h]) / 8)


def test_ties_in_a_slice_takes_the_base_from_its_sources(llamas, tmp_path):
    """A method with a base merges the other sources' task vectors over the base's layers:
    one expert with density 1 is the expert itself."""
    paths, states = llamas
    a, b = str(paths["a"]), str(paths["b"])
    recipe = {"merge_method": "ties", "base_model": a, "parameters": {"density": 1.0},
              "slices": [{"sources": [{"model": a, "layer_range": [2, 4]},
                                      {"model": b, "layer_range": [0, 2]}]}]}
    out = tmp_path / "ties"
    supermerge.merge(recipe, out)
    got = weights(out)
    for index in range(2):
        mine, want = layer(got, index), layer(states["b"], index)
        for name in mine:
            torch.testing.assert_close(mine[name], want[name])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2


def test_one_model_twice_in_a_slice_averages_its_own_layers(llamas, tmp_path):
    paths, states = llamas
    out = tmp_path / "self"
    supermerge.merge(sliced([[(paths["a"], 0, 2), (paths["a"], 2, 4)]], "linear"), out)
    got = weights(out)
    for index in range(2):
        mine, low, high = layer(got, index), layer(states["a"], index), layer(states["a"],
                                                                              index + 2)
        for name in mine:
            torch.testing.assert_close(mine[name], (low[name] + high[name]) / 2)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2


# -- refusals before any weight is read --------------------------------------------------


@pytest.fixture
def no_reads(monkeypatch):
    """Make any weight read fail: a refusal must come from the headers alone."""
    from supermerge.io.checkpoint import Checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(Checkpoint, "read", refuse)


def test_a_range_past_the_last_layer_names_model_range_and_count(llamas, tmp_path, no_reads):
    paths, _ = llamas
    with pytest.raises(PlanError) as err:
        supermerge.merge(sliced([[(paths["a"], 0, 3)], [(paths["b"], 2, 6)]]), tmp_path / "o")
    text = str(err.value)
    assert "slices[1].sources[0]" in text and "[2, 6]" in text and "4 layers" in text
    assert str(paths["b"]) in text and "half-open" in text
    assert not (tmp_path / "o").exists()


def test_unequal_ranges_in_a_slice_are_refused(llamas, tmp_path, no_reads):
    paths, _ = llamas
    with pytest.raises(PlanError, match="same length"):
        supermerge.merge(sliced([[(paths["a"], 0, 3), (paths["b"], 0, 2)]], "linear"),
                         tmp_path / "o")


def test_a_base_method_needs_the_base_among_the_sources(llamas, tmp_path, no_reads):
    paths, _ = llamas
    recipe = sliced([[(paths["b"], 0, 2)]], "task_arithmetic", base_model=str(paths["a"]))
    with pytest.raises(PlanError, match="base model among the slice's sources"):
        supermerge.merge(recipe, tmp_path / "o")


def test_passthrough_slices_take_one_source(llamas, tmp_path, no_reads):
    paths, _ = llamas
    with pytest.raises(PlanError, match=r"slices\[0\].*exactly 1"):
        supermerge.merge(sliced([[(paths["a"], 0, 2), (paths["b"], 0, 2)]]), tmp_path / "o")


@pytest.mark.parametrize("bad, message", [
    ({"models": [{"model": "x"}]}, "not both"),
    ({"slices": []}, "empty"),
    ({"slices": [{"sources": [{"model": "x", "layer_range": [3, 1]}]}]}, "0 <= start < end"),
    ({"slices": [{"sources": [{"model": "x", "layer_range": [0]}]}]}, "layer_range"),
    ({"slices": [{"sources": [{"model": "x", "layer_range": [0, 1], "weight": 1}]}]}, "weight"),
])
def test_malformed_slices_are_refused_at_load(bad, message):
    data = {"merge_method": "passthrough",
            "slices": [{"sources": [{"model": "x", "layer_range": [0, 1]}]}], **bad}
    with pytest.raises(RecipeError, match=message):
        supermerge.merge(data, "unused-out")


@pytest.mark.parametrize("extra, message", [
    ({"heads": ["lm_head."]}, "`heads`"),
    ({"output": "adapter", "rank": 2, "base_model": "A"}, "output: adapter"),
    ({"merge_method": "ties", "base_model": "A", "parameters": {"trim_scope": "model"}},
     "whole-model statistic"),
    ({"merge_method": "tall_masks", "base_model": "A"}, "per-task masks"),
])
def test_whole_model_options_are_refused_with_slices(llamas, tmp_path, no_reads, extra,
                                                     message):
    paths, _ = llamas
    a = str(paths["a"])
    extra = {k: a if v == "A" else v for k, v in extra.items()}
    recipe = {**sliced([[(paths["a"], 0, 2)], [(paths["b"], 0, 2)]]), **extra}
    if extra.get("merge_method") in ("ties", "tall_masks"):  # the base among the sources
        recipe["slices"] = [{"sources": [{"model": a, "layer_range": [0, 2]},
                                         {"model": str(paths["b"]), "layer_range": [0, 2]}]}]
    with pytest.raises(PlanError, match=message):
        supermerge.merge(recipe, tmp_path / "o")


def test_a_merge_spec_with_slices_fills_its_models():
    from supermerge.engine import MergeSpec, ModelSpec, SliceSource, SliceSpec

    pieces = [SliceSpec([SliceSource("x", [0, 2]), SliceSource("y", [0, 2])]),
              SliceSpec([SliceSource("y", [2, 3])])]
    spec = MergeSpec("linear", [], slices=pieces)
    assert [m.path for m in spec.models] == ["x", "y"]
    with pytest.raises(RecipeError, match="leave `models` empty"):
        MergeSpec("linear", [ModelSpec("z")], slices=pieces)


def test_several_block_stacks_are_refused(tmp_path, no_reads):
    from helpers_hf import tiny_llava

    source = save(tiny_llava(0), tmp_path / "llava")
    with pytest.raises(PlanError, match="several numbered block stacks"):
        supermerge.merge(sliced([[(source, 0, 1)]]), tmp_path / "o")


# -- layer swapping (arXiv 2410.01335) as the README shows it ----------------------------


def readme_recipe(heading: str) -> str:
    """The first YAML block after ``heading`` in the README."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text[text.index(heading):]
    return section.split("```yaml\n", 1)[1].split("```", 1)[0]


def test_slices_recipe_from_the_readme(tmp_path):
    """The README's slices example, run as written (a: 4 layers, b: 6)."""
    a = weights(save(tiny_causal_lm("llama", 5, layers=4), tmp_path / "a"))
    b = weights(save(tiny_causal_lm("llama", 6, layers=6), tmp_path / "b"))
    (tmp_path / "slices.yaml").write_text(readme_recipe("### Slices"))
    out = tmp_path / "out"
    supermerge.merge(tmp_path / "slices.yaml", out)
    got = weights(out)
    for index in range(4):  # slice 0: t by the filters' gradient over 4 layers
        mine = layer(got, index)
        name = "self_attn.q_proj.weight"
        t = [0.0, 1 / 3, 2 / 3, 1.0][index]
        torch.testing.assert_close(mine[name], slerp(layer(a, index)[name],
                                                     layer(b, index)[name], t))
    for index in (4, 5):  # slice 1: b is the base (t = 0), t = 0.3 from the recipe
        mine, low, high = layer(got, index), layer(b, index), layer(a, index - 2)
        for name in mine:
            torch.testing.assert_close(mine[name], slerp(low[name], high[name], 0.3),
                                       rtol=1e-5, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    loads_and_generates(out)


def test_layer_swapping_recipe_from_the_readme(tmp_path):
    """The README's recipe, run as written: the math expert's middle layers between the
    language expert's bottom and top ones, embeddings and head from the language expert."""
    paths = {name: save(tiny_causal_lm("llama", seed, layers=8), tmp_path / name)
             for name, seed in (("math-expert", 3), ("language-expert", 4))}
    text = readme_recipe("### Layer swapping")
    (tmp_path / "swap.yaml").write_text(text)
    out = tmp_path / "swapped"
    supermerge.merge(tmp_path / "swap.yaml", out)
    math_, lang = weights(paths["math-expert"]), weights(paths["language-expert"])
    got = weights(out)
    ranges = [(r["model"], *r["layer_range"]) for piece in yaml.safe_load(text)["slices"]
              for r in piece["sources"]]
    assert [(m, a, b) for m, a, b in ranges] == [("./language-expert", 0, 2),
                                                 ("./math-expert", 2, 6),
                                                 ("./language-expert", 6, 8)]
    for index in range(8):
        want = layer(lang if index < 2 or index >= 6 else math_, index)
        mine = layer(got, index)
        assert all(torch.equal(mine[k], want[k]) for k in mine)
    assert torch.equal(got["model.embed_tokens.weight"], lang["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], lang["lm_head.weight"])
    recorded = yaml.safe_load((out / "supermerge_recipe.yaml").read_text())
    assert [s["sources"][0]["layer_range"] for s in recorded["slices"]] == [[0, 2], [2, 6],
                                                                           [6, 8]]
    loads_and_generates(out)
