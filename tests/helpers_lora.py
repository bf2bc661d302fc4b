"""Builders for the LoRA tests: a tiny base model and PEFT adapter folders written by hand in
the layout peft's save_pretrained uses (seeded, no network, no peft needed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from helpers_io import write_model_dir

PREFIX = "base_model.model."

BASE_SHAPES = {
    "model.embed_tokens.weight": (12, 6),
    "model.layers.0.q_proj.weight": (6, 6),
    "model.layers.0.q_proj.bias": (6,),
    "model.layers.0.up_proj.weight": (10, 6),
    "model.layers.1.q_proj.weight": (6, 6),
    "model.layers.1.q_proj.bias": (6,),
    "model.layers.1.up_proj.weight": (10, 6),
    "model.conv.weight": (4, 3, 3, 3),
    "model.norm.weight": (6,),
    "score.weight": (2, 6),
}


def tiny_base(directory: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a base model folder; returns its tensors."""
    gen = torch.Generator().manual_seed(seed)
    state = {n: torch.randn(s, generator=gen) for n, s in BASE_SHAPES.items()}
    write_model_dir(directory, state)
    return state


def factors(out: int, inp: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [rank, inp], B [out, rank]), seeded."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rank, inp, generator=gen), torch.randn(out, rank, generator=gen)


def write_adapter(directory: Path, tensors: dict[str, torch.Tensor], *, r: int,
                  alpha: float, base: str | None = None, **config) -> Path:
    """An adapter folder: ``tensors`` keyed by module name + PEFT suffix (the prefix
    ``base_model.model.`` is added), and adapter_config.json with ``config`` merged in."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({PREFIX + k: v.contiguous() for k, v in tensors.items()},
              directory / "adapter_model.safetensors", metadata={"format": "pt"})
    full = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "base_model_name_or_path": base,
            "target_modules": sorted({k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1]
                                      for k in tensors if ".lora_" in k}),
            "fan_in_fan_out": False, "use_rslora": False, "rank_pattern": {},
            "alpha_pattern": {}, **config}
    (directory / "adapter_config.json").write_text(json.dumps(full))
    return directory


def linear_lora(module: str, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"{module}.lora_A.weight": a, f"{module}.lora_B.weight": b}


def tiny_llama_config(**extra):
    """A 2-layer Llama config (hidden 32, 4 heads, 2 KV heads, vocabulary 64)."""
    import transformers

    return transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, **extra)


def one_adapter(tmp_path: Path, module: str) -> tuple[dict[str, torch.Tensor], Path,
                                                      torch.Tensor]:
    """A tiny base at ``tmp_path/base`` and a rank-2 adapter of its 6x6 ``module`` at
    ``tmp_path/ad``; returns the base's tensors, the adapter folder and its B @ A."""
    base = tiny_base(tmp_path / "base")
    a, b = factors(6, 6, 2, seed=1)
    folder = write_adapter(tmp_path / "ad", linear_lora(module, a, b), r=2, alpha=2,
                           base=str(tmp_path / "base"))
    return base, folder, b @ a
