"""Shared builders: tiny checkpoint families made in the test session (seeded, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from supermerge.learn import Task, TaskData

SHAPES = {
    "model.embed_tokens.weight": (16, 8),
    "model.layers.0.mlp.weight": (8, 8),
    "model.layers.0.mlp.bias": (8,),
    "model.layers.1.mlp.weight": (8, 8),
    "model.layers.1.mlp.bias": (8,),
    "model.norm.weight": (8,),
}


def make_family(k: int = 3, seed: int = 0, shapes: dict | None = None, scale: float = 0.1):
    """Return (base, experts): dicts of float32 tensors; experts = base + seeded task vectors."""
    gen = torch.Generator().manual_seed(seed)
    shapes = shapes or SHAPES
    base = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    experts = [{n: t + scale * torch.randn(t.shape, generator=gen) for n, t in base.items()}
               for _ in range(k)]
    return base, experts


def save_family(root: Path, base: dict, experts: list[dict]) -> tuple[Path, list[Path]]:
    """Write each state dict as a single .safetensors file; returns (base path, expert paths)."""
    root.mkdir(parents=True, exist_ok=True)
    base_path = root / "base.safetensors"
    save_file({n: t.contiguous() for n, t in base.items()}, str(base_path))
    paths = []
    for i, state in enumerate(experts):
        paths.append(root / f"expert{i}.safetensors")
        save_file({n: t.contiguous() for n, t in state.items()}, str(paths[-1]))
    return base_path, paths


@pytest.fixture
def family(tmp_path):
    """A base + 3 experts on disk, with the tensors in memory for oracles."""
    base, experts = make_family()
    base_path, expert_paths = save_family(tmp_path / "in", base, experts)
    return base, experts, base_path, expert_paths


def recipe(method: str, base_path, expert_paths, parameters=None, models=None, **extra) -> dict:
    """A recipe mapping for the Python API."""
    return {
        "merge_method": method,
        "base_model": str(base_path) if base_path is not None else None,
        "models": models or [{"model": str(p)} for p in expert_paths],
        "parameters": parameters or {},
        **extra,
    }


def tiny_encoder(seed: int = 0) -> nn.Module:
    """A 2-block BERT whose output is its mean-pooled states, as the benchmark's encoders."""
    import transformers

    from supermerge.eval.model import MeanPooledEncoder

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=16)
    return MeanPooledEncoder(transformers.BertModel(config)).eval()


def inputs(n: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[: n // 2, 5:] = 0  # padding in half of the examples
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


@pytest.fixture(scope="module")
def tiny_bert_tasks():
    """A base encoder, two experts (perturbed copies) and a 3-class head per task."""
    module = tiny_encoder()
    base = {k: v.clone() for k, v in module.state_dict().items()}
    experts, heads, tasks = {}, {}, []
    for index, name in enumerate(["a", "b"]):
        generator = torch.Generator().manual_seed(10 + index)
        experts[name] = {k: v + 0.05 * torch.randn(v.shape, generator=generator)
                         if v.is_floating_point() else v for k, v in base.items()}
        torch.manual_seed(20 + index)
        heads[name] = nn.Linear(16, 3)
        data = inputs(12, index)
        tasks.append(Task(name, TaskData(data, torch.randint(0, 3, (12,)), f"{name}.jsonl")))
    return module, base, experts, heads, tasks
