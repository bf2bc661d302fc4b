"""mergekit's own configs run unchanged (issue 17): our copies of the structures of the
example configs in mergekit's ``examples/*.yml`` and of the configs in its
``tests/test_basic_merges.py``, on tiny models built here. Each merges and the output
loads in transformers and generates, or is refused where mergekit refuses it (DELLA with
epsilon 1.35). The examples name Hugging Face hub ids: they resolve from a fake local
hub cache holding tiny models under those ids, so the YAML is mergekit's, word for word.
The tokenizer configs live in test_mergekit_tokenizers.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import supermerge
from helpers_hf import loads_and_generates, perturbed, save, tiny_causal_lm, tiny_llava, weights
from supermerge.errors import PlanError

transformers = pytest.importorskip("transformers")
pytest.importorskip("huggingface_hub")

COMMIT = "0123456789abcdef0123456789abcdef01234567"

# -- mergekit's examples/*.yml, as written there ------------------------------------------

EXAMPLES = {
    "arcee_fusion": """
models:
  - model: model_a
  - model: model_b
merge_method: arcee_fusion
base_model: model_a
dtype: bfloat16
""",
    "bio-merge": """
models:
  - model: mistralai/Mistral-7B-Instruct-v0.2
    parameters:
      density: 0.5
      weight: 0.5
  - model: BioMistral/BioMistral-7B
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  normalize: false
  int8_mask: true
dtype: float16
""",
    "gradient-slerp": """
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
# or, the equivalent models: syntax:
# models:
#   - model: psmathur/orca_mini_v3_13b
#   - model: garage-bAInd/Platypus2-13B
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
""",
    "linear": """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
""",
    "orcamini-platy-44layer": """
slices:
  - sources:
    - model: psmathur/orca_mini_v3_13b
      layer_range: [0, 24]
  - sources:
    - model: garage-bAInd/Platypus2-13B
      layer_range: [20, 40]
merge_method: passthrough
dtype: float16
""",
    "ties": """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
}

# the 13B Llama-2 family of the examples: 40 blocks, as theirs (tiny ones)
LLAMA_40 = ["TheBloke/Llama-2-13B-fp16", "psmathur/orca_mini_v3_13b",
            "garage-bAInd/Platypus2-13B", "WizardLM/WizardLM-13B-V1.2",
            "WizardLM/WizardMath-13B-V1.0"]
MISTRAL = ["mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.2",
           "BioMistral/BioMistral-7B"]


def family(kind: str, count: int, layers: int, builder=None):
    """``count`` models: a seeded base, then fine-tunes of it."""
    build = builder or (lambda: tiny_causal_lm(kind, 0, layers=layers))
    return [build() if i == 0 else perturbed(build(), seed=100 + i) for i in range(count)]


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hugging Face hub cache (blobs, refs/main, snapshots) holding tiny models under the
    examples' hub ids, and a folder holding model_a and model_b (arcee_fusion's paths)."""
    cache = tmp_path_factory.mktemp("hf-cache")
    for ids, kind, layers in ((LLAMA_40, "llama", 40), (MISTRAL, "mistral", 2)):
        for repo_id, model in zip(ids, family(kind, len(ids), layers), strict=True):
            repo = cache / f"models--{repo_id.replace('/', '--')}"
            save(model, repo / "snapshots" / COMMIT)
            (repo / "refs").mkdir()
            (repo / "refs" / "main").write_text(COMMIT)
            (repo / "blobs").mkdir()
    local = tmp_path_factory.mktemp("examples")
    for name, model in zip(("model_a", "model_b"), family("llama", 2, 2), strict=True):
        save(model, local / name)
    return cache, local


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_mergekit_example(name, hub_cache, tmp_path, monkeypatch):
    cache, local = hub_cache
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = local / f"{name}.yml"
    recipe.write_text(EXAMPLES[name])
    out = tmp_path / "out"
    supermerge.merge(recipe, out)
    check_output(out)
    config = json.loads((out / "config.json").read_text())
    if name == "orcamini-platy-44layer":
        assert config["num_hidden_layers"] == 44
        orca = weights(next((cache / "models--psmathur--orca_mini_v3_13b").glob("snapshots/*")))
        platy = weights(next((cache / "models--garage-bAInd--Platypus2-13B").glob("snapshots/*")))
        got = weights(out)
        for name_, tensor in got.items():
            if name_.startswith("model.layers.43."):  # Platypus's layer 39
                want = platy[name_.replace(".43.", ".39.")]
                assert torch.equal(tensor, want.half())
            if name_.startswith("model.layers.23."):  # orca's layer 23
                assert torch.equal(tensor, orca[name_].half())
    card = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    if name != "arcee_fusion":  # hub ids only in the card's base_model, each once
        assert card["base_model"] and len(set(card["base_model"])) == len(card["base_model"])
        assert all("/" in m and not m.startswith("/") for m in card["base_model"])


def check_output(out: Path, model_class=None):
    """mergekit's run_and_check_merge, plus: weights and config.json written, no NaN,
    the model loads in transformers and generates."""
    assert (out / "config.json").exists()
    assert (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists()
    assert all(not t.isnan().any() for t in weights(out).values())
    return loads_and_generates(out, model_class)


# -- the configs of mergekit's tests/test_basic_merges.py --------------------------------


def pico_llama():
    """mergekit's make_picollama: 2 blocks of width 32, 16 heads."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_attention_heads=16, num_hidden_layers=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """mergekit's test fixtures: model_a/b/c (pico Llama), granite_a/b, gpt2_like (12
    blocks, as theirs, but 32 wide), vlm_a/b/c (pico Llava)."""
    root = tmp_path_factory.mktemp("zoo")
    builders = {"model": pico_llama,
                "granite": lambda: tiny_causal_lm("granite", 0, layers=2),
                "vlm": lambda: tiny_llava(0)}
    paths = {}
    for prefix, count in (("model", 3), ("granite", 2), ("vlm", 3)):
        for letter, model in zip("abc"[:count], family(prefix, count, 2, builders[prefix]),
                                 strict=True):
            paths[f"{prefix}_{letter}"] = str(save(model, root / f"{prefix}_{letter}"))
    paths["gpt2_like"] = str(save(tiny_causal_lm("gpt2", 0, layers=12), root / "gpt2_like"))
    return paths


def two_model(a, b, method, base=None, params=None):
    """mergekit's two_model_config: weights 0.6 and 0.4, bfloat16."""
    return {"merge_method": method, "base_model": base,
            "models": [{"model": a, "parameters": {"weight": 0.6}},
                       {"model": b, "parameters": {"weight": 0.4}}],
            "dtype": "bfloat16", "parameters": params or {}}


def nuslerp_configs(prefix: str) -> dict:
    """test_nuslerp_merges: base none or c, row_wise and flatten both ways; weights that
    sum to zero."""
    configs = {}
    for base in (None, "c"):
        for row_wise in (False, True):
            for flatten in (False, True):
                configs[f"nuslerp base={base} row_wise={row_wise} flatten={flatten}"] = (
                    lambda z, base=base, row_wise=row_wise, flatten=flatten: two_model(
                        z[f"{prefix}_a"], z[f"{prefix}_b"], "nuslerp",
                        z[f"{prefix}_{base}"] if base else None,
                        {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}))

    def zero_sum(z):
        config = two_model(z[f"{prefix}_a"], z[f"{prefix}_b"], "nuslerp", z[f"{prefix}_c"],
                           {"nuslerp_row_wise": False, "nuslerp_flatten": False})
        config["models"][0]["parameters"]["weight"] = -0.5
        config["models"][1]["parameters"]["weight"] = 0.5
        return config

    configs["nuslerp weights summing to zero"] = zero_sum
    return configs


def base_configs(p: str) -> dict:
    """The two-model configs with a third model as base, for model_* and vlm_* alike."""
    return {
        "task_arithmetic": lambda z: two_model(z[f"{p}_a"], z[f"{p}_b"], "task_arithmetic",
                                               z[f"{p}_c"]),
        "breadcrumbs": lambda z: two_model(z[f"{p}_a"], z[f"{p}_b"], "breadcrumbs", z[f"{p}_c"]),
        "ties": lambda z: two_model(z[f"{p}_a"], z[f"{p}_b"], "ties", z[f"{p}_c"],
                                    {"density": 0.3}),
        "dare_ties": lambda z: two_model(z[f"{p}_a"], z[f"{p}_b"], "dare_ties", z[f"{p}_c"],
                                         {"density": 0.66}),
        "model_stock": lambda z: two_model(z[f"{p}_b"], z[f"{p}_c"], "model_stock", z[f"{p}_a"]),
        "model_stock_filterwise": lambda z: two_model(z[f"{p}_b"], z[f"{p}_c"], "model_stock",
                                                      z[f"{p}_a"], {"filter_wise": True}),
    }


def slerp_config(p: str):
    def build(z):
        config = two_model(z[f"{p}_a"], z[f"{p}_b"], "slerp", z[f"{p}_a"])
        config["parameters"] = {"t": 0.35}
        return config
    return build


BASIC = {
    "granite_copy": lambda z: {"merge_method": "passthrough", "dtype": "bfloat16",
                               "models": [{"model": z["granite_a"]}]},
    "granite_linear_merge": lambda z: {
        "merge_method": "linear", "dtype": "bfloat16",
        "models": [{"model": z["granite_a"], "parameters": {"weight": 0.6}},
                   {"model": z["granite_b"], "parameters": {"weight": 0.4}}]},
    "granite_slerp": lambda z: {
        "merge_method": "slerp", "base_model": z["granite_a"], "dtype": "bfloat16",
        "models": [{"model": z["granite_a"]}, {"model": z["granite_b"]}],
        "parameters": {"t": 0.5}},
    "gpt2_copy": lambda z: {"merge_method": "passthrough", "dtype": "bfloat16",
                            "models": [{"model": z["gpt2_like"]}]},
    "gpt2_stack": lambda z: {
        "merge_method": "passthrough", "dtype": "bfloat16",
        "slices": [{"sources": [{"model": z["gpt2_like"], "layer_range": [0, 12]}]}] * 2},
    "passthrough_scale": lambda z: {
        "merge_method": "passthrough",
        "models": [{"model": z["model_a"], "parameters": {
            "scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]}}]},
    "linear": lambda z: two_model(z["model_a"], z["model_b"], "linear"),
    "slerp": slerp_config("model"),
    **nuslerp_configs("model"),
    **base_configs("model"),
    "sce": lambda z: two_model(z["model_a"], z["model_b"], "sce", z["model_c"],
                               {"select_topk": 0.5}),
    "ram": lambda z: two_model(z["model_a"], z["model_b"], "ram", z["model_c"]),
    "ramplus_tl": lambda z: two_model(z["model_a"], z["model_b"], "ramplus_tl", z["model_c"],
                                      {"r": 0.05, "alpha": 1.0}),
    "multislerp": lambda z: two_model(z["model_a"], z["model_b"], "multislerp", z["model_c"]),
    "arcee_fusion": lambda z: two_model(z["model_a"], z["model_b"], "arcee_fusion",
                                        z["model_a"]),
    "nearswap": lambda z: two_model(z["model_a"], z["model_b"], "nearswap", z["model_a"],
                                    {"t": 0.0001}),
    "della": lambda z: two_model(z["model_a"], z["model_b"], "della", z["model_c"],
                                 {"density": 0.66, "epsilon": 0.05, "lambda": 0.5}),
    "karcher": lambda z: two_model(z["model_a"], z["model_b"], "karcher", z["model_c"],
                                   {"max_iter": 5, "tol": 1e-5}),
    "linear_VLM": lambda z: two_model(z["vlm_a"], z["vlm_b"], "linear"),
    "slerp_VLM": slerp_config("vlm"),
    **{f"{name}_VLM": build for name, build in nuslerp_configs("vlm").items()},
    **{f"{name}_VLM": build for name, build in base_configs("vlm").items()},
}


@pytest.mark.parametrize("name", list(BASIC))
def test_mergekit_basic_merge(name, zoo, tmp_path):
    out = tmp_path / "out"
    supermerge.merge(BASIC[name](zoo), out)
    model_class = transformers.AutoModelForImageTextToText if "VLM" in name else None
    model = check_output(out, model_class)
    if name == "gpt2_stack":
        assert transformers.AutoConfig.from_pretrained(out).n_layer == 24
        assert len(model.transformer.h) == 24
    if name == "passthrough_scale":
        got = weights(out)
        o_proj = [t for n, t in got.items() if "o_proj" in n]
        assert o_proj and all((t == 0).all() for t in o_proj)
        assert got["lm_head.weight"].count_nonzero() > 0
    if "VLM" in name:  # every tensor of the Llava kept
        assert weights(out).keys() == weights(Path(zoo["vlm_a"])).keys()


def test_della_invalid_epsilon_is_refused(zoo, tmp_path):
    """test_della_invalid_epsilon: mergekit refuses epsilon 1.35 (density +- epsilon must
    stay within [0, 1]); so do we, before any weight is read, naming the parameter."""
    config = two_model(zoo["model_a"], zoo["model_b"], "della", zoo["model_c"],
                       {"density": 0.66, "epsilon": 1.35, "lambda": 0.5})
    with pytest.raises(PlanError, match="epsilon"):
        supermerge.merge(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_gradient_slerp_example_matches_its_slices_semantics(hub_cache, tmp_path,
                                                                  monkeypatch):
    """gradient-slerp's comment says the `models:` syntax is equivalent: both give the
    same bytes (one slice over all 40 layers is the whole model)."""
    cache, local = hub_cache
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    sliced = yaml.safe_load(EXAMPLES["gradient-slerp"])
    whole = {**sliced, "models": [{"model": "psmathur/orca_mini_v3_13b"},
                                  {"model": "garage-bAInd/Platypus2-13B"}]}
    del whole["slices"]
    supermerge.merge(sliced, tmp_path / "sliced")
    supermerge.merge(whole, tmp_path / "whole")
    a, b = weights(tmp_path / "sliced"), weights(tmp_path / "whole")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
