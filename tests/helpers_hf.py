"""Tiny transformers models built in the test session (seeded, no network) and the checks
every merged output gets: it loads with transformers and generates."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def tiny_causal_lm(kind: str, seed: int, layers: int = 4, vocab: int = 64):
    """A seeded random causal LM of ``kind`` (llama, mistral, granite, qwen2, gpt2) with
    ``layers`` blocks of width 16 or 32: a few thousand parameters per block."""
    import transformers

    torch.manual_seed(seed)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4,
                                         n_positions=64)
        return transformers.GPT2LMHeadModel(config)
    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
               "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}
    config_class, model_class = classes[kind]
    config = config_class(vocab_size=vocab, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64)
    return model_class(config)


def tiny_llava(seed: int):
    """A seeded random Llava (CLIP vision tower + 2-block Llama), as mergekit's tests'."""
    import transformers

    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2,
                                           num_attention_heads=2, hidden_size=64,
                                           intermediate_size=128)
    text = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                    num_attention_heads=4, num_hidden_layers=2)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text,
                                      image_seq_length=16)
    return transformers.LlavaForConditionalGeneration(config)


def perturbed(model, seed: int, scale: float = 0.02):
    """A stand-in 'fine-tune': the model plus a seeded small update of every weight."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def save(model, path: Path) -> Path:
    """Save ``model`` as a Hugging Face folder at ``path``; returns it."""
    model.save_pretrained(path)
    return path


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder (one or several safetensors files)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def loads_and_generates(folder: Path, model_class=None):
    """Load the model at ``folder`` with transformers (AutoModelForCausalLM unless
    ``model_class``) and greedily generate 4 tokens; returns the model."""
    import transformers

    model_class = model_class or transformers.AutoModelForCausalLM
    model = model_class.from_pretrained(folder).eval()
    prompt = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                             max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             pad_token_id=0)
    assert out.shape == (1, 7) and torch.equal(out[:, :3], prompt)
    return model
