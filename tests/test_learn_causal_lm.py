"""`supermerge learn` on tiny Llama language models: every data-driven method, LM data."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from click.testing import CliRunner

from helpers_words import VOCAB_SIZE, WORDS, word_tokenizer
from supermerge.cli.main import cli

transformers = pytest.importorskip("transformers")



def tiny_llama(seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=16,
                                      intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=32, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory):
    """A base and two experts, each tuned to continue prompts with its own word."""
    root = tmp_path_factory.mktemp("lm")
    tokenizer = word_tokenizer(root)
    tiny_llama(0).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    rng = random.Random(0)
    experts = []
    for word in ["cat", "rain"]:
        rows = [{"input": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))),
                 "label": f" {word}"} for _ in range(24)]
        model = tiny_llama(0)
        batch = tokenizer([r["input"] + r["label"] for r in rows], return_tensors="pt",
                          padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(30):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.save_pretrained(root / word)
        (root / f"{word}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        experts.append({"model": word, "data": f"{word}.jsonl"})
    return root, {"base_model": "base", "architecture": "causal_lm", "max_length": 12,
                  "experts": experts}


@pytest.mark.parametrize(("method", "parameters"), [
    ("supermerge", {"steps": 4, "eval_every": 2, "batch_size": 8}),
    ("supermerge", {"steps": 4, "eval_every": 2, "batch_size": 8, "objective": "distill",
                    "basis": "tsv"}),
    ("supermerge", {"steps": 4, "eval_every": 2, "batch_size": 8, "memory": "stream"}),
    ("supermerge", {"steps": 4, "eval_every": 2, "batch_size": 8,
                    "objective": "labels+distill"}),
    ("adamerging", {"steps": 4, "eval_every": 2, "batch_size": 8}),
    ("adamerging", {"steps": 4, "eval_every": 2, "batch_size": 8, "objective": "distill"}),
    ("fisher", {"examples": 8}),
    ("regmean", {"examples": 16, "alpha": 0.5}),
])
def test_every_data_driven_method_merges_language_models(lm_setup, tmp_path, method,
                                                         parameters):
    root, recipe = lm_setup
    path = root / f"{method}.yaml"
    path.write_text(yaml.safe_dump({**recipe, "merge_method": method,
                                    "parameters": parameters}))
    out = tmp_path / method
    result = CliRunner().invoke(cli, ["learn", str(path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    merged = transformers.LlamaForCausalLM.from_pretrained(out)
    base = transformers.LlamaForCausalLM.from_pretrained(root / "base")
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.isfinite(merged(ids).logits).all()
    changed = [n for n, t in merged.state_dict().items()
               if not torch.equal(t, base.state_dict()[n])]
    assert any("layers.0.mlp" in n for n in changed), changed  # the experts reached it
    assert not (out / "heads").exists()  # language models have no per-task head


def test_exact_fisher_is_refused_for_language_models_before_loading(lm_setup, tmp_path):
    root, recipe = lm_setup
    path = root / "exact.yaml"
    path.write_text(yaml.safe_dump({**recipe, "merge_method": "fisher",
                                    "parameters": {"labels": "exact"}}))
    result = CliRunner().invoke(cli, ["learn", str(path), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "labels: sampled" in result.output
    assert not (tmp_path / "o").exists()


def test_prompts_that_fill_max_length_leave_nothing_to_score_and_stop_training(lm_setup,
                                                                                tmp_path):
    root, recipe = lm_setup
    (root / "long.jsonl").write_text("\n".join(
        json.dumps({"input": " ".join(WORDS[:8]), "label": " cat"}) for _ in range(8)))
    experts = [{**e, "data": "long.jsonl"} for e in recipe["experts"]]
    path = root / "short.yaml"
    path.write_text(yaml.safe_dump({**recipe, "merge_method": "supermerge", "max_length": 4,
                                    "experts": experts,
                                    "parameters": {"steps": 2, "objective": "labels"}}))
    out = tmp_path / "o"
    result = CliRunner().invoke(cli, ["learn", str(path), "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert "loss of task" in result.output and "max_length" in result.output
    assert not out.exists()
