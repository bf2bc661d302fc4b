"""Builders for the io tests: small state dicts and model directories in the layouts of
Hugging Face, written in the test session (seeded, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from supermerge.io import Checkpoint


def sample_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A Llama-like state dict with float32, bfloat16, float16, int64, bool, 0-d and empty
    tensors (the output embedding is left out, as a model with tied embeddings stores it)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=gen),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=gen).bfloat16(),
        "model.layers.0.input_layernorm.weight": torch.randn(8, generator=gen).half(),
        "model.layers.0.position_ids": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "model.layers.1.mlp.up_proj.weight": torch.randn(4, 8, generator=gen),
        "model.mask": torch.rand(5, generator=gen) > 0.5,
        "model.scale": torch.tensor(3.5),
        "model.empty": torch.zeros(0, 4),
    }


def write_model_dir(
    directory: Path,
    state: dict[str, torch.Tensor],
    *,
    shards: int = 1,
    fmt: str = "safetensors",
    config: dict | None = None,
) -> Path:
    """Write ``state`` as a Hugging Face directory: config.json plus one weights file or
    ``shards`` shards with an index, in safetensors or torch ("bin") format."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    stem, suffix = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")

    def save(part: dict[str, torch.Tensor], file: Path) -> None:
        if fmt == "safetensors":
            save_file(part, file, metadata={"format": "pt"})
        else:
            torch.save(part, file)

    if shards == 1:
        save(state, directory / f"{stem}.{suffix}")
        return directory
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"{stem}-{i + 1:05d}-of-{shards:05d}.{suffix}"
        part = {n: state[n] for n in names[i::shards]}
        save(part, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / f"{stem}.{suffix}.index.json").write_text(json.dumps(index))
    return directory


def assert_matches(ckpt: Checkpoint, state: dict[str, torch.Tensor]) -> None:
    """The checkpoint holds exactly ``state``: names, header shapes/dtypes and values."""
    assert sorted(ckpt.names()) == sorted(state)
    for name, expected in state.items():
        info = ckpt.info(name)
        assert (info.shape, info.dtype) == (tuple(expected.shape), expected.dtype), name
        assert info.nbytes == expected.numel() * expected.element_size()
        got = ckpt.read(name)
        assert got.dtype == expected.dtype and torch.equal(got, expected), name


def layout_of(state: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """The (name, shape, dtype) layout CheckpointWriter takes, in ``state``'s order."""
    return [(name, tuple(t.shape), t.dtype) for name, t in state.items()]


class RunsCode:
    """A pickle payload that runs code when unpickled: ``touch marker``. Loading a file that
    holds one must be refused, and the marker never appear."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))
