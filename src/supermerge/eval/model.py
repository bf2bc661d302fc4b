"""Encoders, task heads, batching and prediction for text classification.

A task's classifier is a pretrained encoder (any Hugging Face ``AutoModel`` whose output
has ``last_hidden_state``), mean pooling over the real tokens, and a linear head of its
own. Merges touch the encoder only; every task keeps its head, stored as
``heads/<task>.safetensors`` (``weight``, ``bias``) beside the encoder's weights, the
layout :func:`supermerge.learn.export_learned` writes too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from supermerge.errors import CheckpointError
from supermerge.learn.modules import MeanPooledEncoder, read_linear_head

HEADS_DIR = "heads"


def head_path(model_dir: str | Path, task: str) -> Path:
    """Return where ``task``'s head lives in a model directory."""
    return Path(model_dir) / HEADS_DIR / f"{task}.safetensors"


def load_encoder(path: str | Path) -> MeanPooledEncoder:
    """Load a Hugging Face model directory as a :class:`MeanPooledEncoder` in eval mode.

    Raises CheckpointError if transformers cannot load it. Costs one read of its weights.
    """
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load an encoder: {err}", file=path,
                              fix="give a Hugging Face model directory (config.json + "
                              "weights)") from None
    return MeanPooledEncoder(model).eval()


def load_tokenizer(*candidates: str | Path) -> Any:
    """Return the tokenizer of the first directory that has one (a fast one if possible).

    Raises CheckpointError if none has.
    """
    from transformers import AutoTokenizer

    for path in candidates:
        if any((Path(path) / f).is_file() for f in ("tokenizer.json", "vocab.txt",
                                                     "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(str(path))
    raise CheckpointError("no tokenizer found", file=", ".join(map(str, candidates)) or None,
                          fix="copy the base model's tokenizer files into the model directory")


def new_head(hidden: int, classes: int, seed: int) -> nn.Linear:
    """Return a seeded, freshly initialised linear head."""
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(hidden, classes)
    with torch.no_grad():
        bound = 1 / math.sqrt(hidden)
        head.weight.uniform_(-bound, bound, generator=generator)
        head.bias.zero_()
    return head


def save_head(head: nn.Linear, path: str | Path) -> Path:
    """Write a head as safetensors (``weight``, ``bias``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(path))
    return path


def load_head(path: str | Path) -> nn.Linear:
    """Read a head written by :func:`save_head` (or a learned merge's export), in eval mode.

    Raises CheckpointError if the file is missing or not a linear head.
    """
    return read_linear_head(path)


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Return each text's token ids (special tokens added, truncated to ``max_length``)."""
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def collate(ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad token id lists to the longest; returns ``input_ids`` and ``attention_mask``."""
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def length_batches(lengths: Sequence[int], batch_size: int,
                   generator: torch.Generator) -> Iterator[list[int]]:
    """Yield one epoch of shuffled batches of similar lengths (less padding).

    The examples are shuffled, cut into pools of 50 batches, each pool sorted by length
    and cut into batches, and the batches shuffled.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    pool = 50 * batch_size
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    for b in torch.randperm(len(batches), generator=generator).tolist():
        yield batches[b]


@torch.no_grad()
def predict(encoder: nn.Module, head: nn.Module, ids: Sequence[Sequence[int]], pad_id: int,
            batch_size: int = 64, on_batch: Callable[[], None] | None = None) -> list[int]:
    """Return the predicted class of each tokenised text, in input order.

    Batches are formed by length; ``on_batch`` is called after each. Costs one forward
    pass per ``batch_size`` texts.
    """
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    predictions = [0] * len(ids)
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        logits = head(encoder(**collate([ids[i] for i in chosen], pad_id)))
        for i, p in zip(chosen, logits.argmax(-1).tolist(), strict=True):
            predictions[i] = p
        if on_batch is not None:
            on_batch()
    return predictions
