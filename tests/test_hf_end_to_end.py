"""Merges of tiny Hugging Face models built in the session, reloaded with transformers and run."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import supermerge
from helpers_hf import perturbed

transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int, tie: bool):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def llama_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base = tiny_llama(0, tie=False)
    base.save_pretrained(root / "base")
    (root / "base" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32}))
    paths = []
    for i in range(3):
        model = perturbed(tiny_llama(0, tie=False), seed=10 + i)
        paths.append(root / f"expert{i}")
        model.save_pretrained(paths[-1], max_shard_size="20KB")  # sharded input
    return root, paths


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic", "slerp"])
def test_merged_llama_reloads_and_runs(llama_family, tmp_path, method):
    root, paths = llama_family
    models = paths[:2] if method == "slerp" else paths
    out = tmp_path / "merged"
    supermerge.merge({"merge_method": method, "base_model": str(root / "base"),
                      "models": [{"model": str(p)} for p in models],
                      "parameters": {"t": 0.5} if method == "slerp" else {},
                      "dtype": "bfloat16"}, out, shard_size=5_000)
    assert (out / "model.safetensors.index.json").exists()
    assert (out / "tokenizer_config.json").exists()
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model_relation"] == "merge" and "supermerge" in front["tags"]
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert next(merged.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        logits = merged(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all() and logits.shape == (1, 4, 64)


def test_tied_expert_lends_its_embedding_to_the_untied_base_head(tmp_path):
    base = tiny_llama(0, tie=False)
    base.save_pretrained(tmp_path / "base")
    tied = perturbed(tiny_llama(0, tie=True), seed=3)
    tied.save_pretrained(tmp_path / "tied")
    untied = perturbed(tiny_llama(0, tie=False), seed=4)
    untied.save_pretrained(tmp_path / "untied")
    out = tmp_path / "out"
    supermerge.merge({"merge_method": "linear", "base_model": str(tmp_path / "base"),
                      "models": [str(tmp_path / "tied"), str(tmp_path / "untied")]}, out)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    expected = (tied.model.embed_tokens.weight + untied.lm_head.weight) / 2
    torch.testing.assert_close(merged.lm_head.weight, expected)
