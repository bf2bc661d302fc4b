"""Tiny real Hugging Face models: read what save_pretrained wrote, write what
from_pretrained loads."""

from __future__ import annotations

import pytest
import torch

from supermerge.io import CheckpointWriter, open_checkpoint, tied_aliases

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("max_shard_size", [None, "10KB"])
def test_save_pretrained_reads_back(tmp_path, tiny_llama, max_shard_size):
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    tiny_llama.save_pretrained(tmp_path / "m", **kwargs)
    state = tiny_llama.state_dict()
    with open_checkpoint(tmp_path / "m") as ckpt:
        assert (tmp_path / "m" / "model.safetensors.index.json").exists() == bool(kwargs)
        aliases = tied_aliases(ckpt)
        assert aliases == {"lm_head.weight": "model.embed_tokens.weight"}
        assert set(ckpt.names()) | set(aliases) == set(state)
        for name, expected in state.items():
            assert torch.equal(ckpt.read(aliases.get(name, name)), expected), name
        assert ckpt.config["model_type"] == "llama"


@pytest.mark.parametrize("streamed", [False, True], ids=["buffered", "layout"])
def test_written_model_loads_with_from_pretrained(tmp_path, tiny_llama, streamed):
    tiny_llama.save_pretrained(tmp_path / "base")
    with open_checkpoint(tmp_path / "base") as ckpt, CheckpointWriter(
        tmp_path / "merged", shard_size=8 * 1024,
        layout=[(i.name, i.shape, i.dtype) for i in ckpt.infos().values()] if streamed else None,
    ) as writer:
        for name in ckpt.names():
            writer.add(name, ckpt.read(name))
        writer.copy_model_files(ckpt.model_dir)
        writer.write_model_card(base_models=["tiny/a", "tiny/b"], method="linear",
                                recipe_yaml="merge_method: linear\n")
        out = writer.commit()
    assert (out / "model.safetensors.index.json").exists()

    merged = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    for name, expected in tiny_llama.state_dict().items():
        assert torch.equal(merged.state_dict()[name], expected), name
    tokens = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(merged(tokens).logits, tiny_llama(tokens).logits)
