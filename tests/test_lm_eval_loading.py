"""A merged causal LM loads as lm-evaluation-harness's `hf` model loads it.

`lm_eval --model hf --model_args pretrained=OUT` builds its model (lm_eval/models/
huggingface.py, HFLM) with AutoConfig, AutoTokenizer(use_fast=True) and
AutoModelForCausalLM(dtype="auto") on the folder, gives a tokenizer without a pad token
its unk (or eos) token, and scores a continuation by the log-softmax of the model's logits.
This test does the same on a tiny Llama merged by `supermerge merge`: no network, no
lm_eval install, no task download.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from supermerge.cli.main import cli

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ["the", "cat", "sat", "on", "mat", "rain", "falls", "today", "a", "dog"]


def fast_tokenizer():
    """A word-level fast tokenizer with Llama's special tokens and no pad token."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    model = tokenizers.models.WordLevel(vocab, unk_token="<unk>")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")


def tiny_llama(vocab_size: int, seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=16,
                                      intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=32, bos_token_id=1,
                                      eos_token_id=2)
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def merged_lm(tmp_path_factory):
    """A base with its tokenizer, two experts (base + seeded noise), merged with task
    arithmetic into bfloat16; returns (out folder, the expected merged state)."""
    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = fast_tokenizer()
    base = tiny_llama(len(tokenizer), 0)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    deltas = []
    for i, name in enumerate(["expert_a", "expert_b"]):
        gen = torch.Generator().manual_seed(10 + i)
        delta = {k: 0.05 * torch.randn(v.shape, generator=gen) for k, v in base_state.items()}
        base.load_state_dict({k: base_state[k] + delta[k] for k in base_state})
        base.save_pretrained(root / name)  # weights and config only, as a fine-tune might
        deltas.append(delta)
    recipe = {"merge_method": "task_arithmetic", "base_model": "base",
              "models": ["expert_a", "expert_b"], "parameters": {"lambda": 0.5},
              "dtype": "bfloat16"}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = root / "merged"
    result = CliRunner().invoke(cli, ["merge", str(root / "recipe.yaml"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    expected = {k: (v + 0.5 * (deltas[0][k] + deltas[1][k])).to(torch.bfloat16)
                for k, v in base_state.items()}
    return out, expected


def load_as_lm_eval_does(pretrained: str):
    """HFLM's _get_config, _get_backend, _create_model and _create_tokenizer, and
    configure_pad_token, with the defaults of `--model hf --model_args pretrained=OUT`."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = transformers.AutoConfig.from_pretrained(pretrained, revision="main",
                                                     trust_remote_code=False)
    assert config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # backend "causal"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        pretrained, revision="main", dtype="auto", trust_remote_code=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        pretrained, revision="main", trust_remote_code=False, use_fast=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = (tokenizer.unk_token_id if tokenizer.unk_token is not None
                                  else tokenizer.eos_token_id)
    return config, model.eval(), tokenizer


def loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """lm_eval's loglikelihood request: (sum of the continuation's log-probabilities,
    whether every continuation token is the greedy one)."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    whole = context_ids + continuation_ids
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)[0, -len(continuation_ids):]
    target = torch.tensor(continuation_ids)
    greedy = bool((logprobs.argmax(-1) == target).all())
    return float(logprobs.gather(-1, target[:, None]).sum()), greedy


def test_the_merged_output_loads_as_lm_eval_hf_loads_it(merged_lm):
    out, expected = merged_lm
    config, model, tokenizer = load_as_lm_eval_does(str(out))
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert model.dtype == torch.bfloat16  # dtype=auto reads the output dtype from config.json
    assert config.max_position_embeddings == 32  # HFLM.max_length comes from here
    assert tokenizer.is_fast and tokenizer.pad_token == "<unk>"
    assert tokenizer("the cat sat", add_special_tokens=False)["input_ids"] == [3, 4, 5]
    state = model.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)
    written = load_file(out / "model.safetensors")
    assert set(written) <= set(state)
    score, _ = loglikelihood(model, tokenizer, "the cat sat on the", " mat")
    assert score < 0 and torch.isfinite(torch.tensor(score))


def test_lm_eval_sees_the_merge_not_the_base(merged_lm):
    out, _ = merged_lm
    _, merged, tokenizer = load_as_lm_eval_does(str(out))
    _, base, _ = load_as_lm_eval_does(str(out.parent / "base"))
    merged_score, _ = loglikelihood(merged, tokenizer, "a dog sat on", " the mat")
    base_score, _ = loglikelihood(base, tokenizer, "a dog sat on", " the mat")
    assert merged_score != base_score
