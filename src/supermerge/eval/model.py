"""Encoders, task heads, batching and prediction for text classification.

A task's classifier is a pretrained encoder (any Hugging Face ``AutoModel`` whose output
has ``last_hidden_state``), mean pooling over the real tokens, and a linear head of its
own. Merges touch the encoder only; every task keeps its head, stored as
``heads/<task>.safetensors`` (``weight``, ``bias``) beside the encoder's weights, the
layout :func:`supermerge.learn.export_learned` writes too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from supermerge.errors import CheckpointError

HEADS_DIR = "heads"


def head_path(model_dir: str | Path, task: str) -> Path:
    """Return where ``task``'s head lives in a model directory."""
    return Path(model_dir) / HEADS_DIR / f"{task}.safetensors"


class MeanPooledEncoder(nn.Module):
    """An encoder whose forward returns the mean of its real tokens' last hidden states.

    It adopts the wrapped model's children, so its state dict has exactly the model's
    tensor names (a merged checkpoint loads into it, and learned merges address the same
    names), and calling it runs the wrapped model's own forward.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        own = [*encoder.named_parameters(recurse=False), *encoder.named_buffers(recurse=False)]
        if own:
            raise TypeError(f"{type(encoder).__name__} holds tensors outside its submodules "
                            f"({own[0][0]}); MeanPooledEncoder cannot adopt it")
        for name, child in encoder.named_children():
            self.add_module(name, child)
        self.__dict__["_wrapped"] = encoder  # not a submodule: its children are ours

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        """Return [batch, hidden] mean-pooled states (padding excluded)."""
        hidden = self._wrapped(input_ids=input_ids, attention_mask=attention_mask,
                              **kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def load_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a checkpoint's tensors, ignoring those the module does not hold (buffers
        that older checkpoints saved, such as ``position_ids``); a missing one is an error.
        """
        own = self.state_dict()
        self.load_state_dict({k: v for k, v in state.items() if k in own})

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the wrapped model as a Hugging Face model directory."""
        self._wrapped.save_pretrained(directory)

    @property
    def hidden_size(self) -> int:
        """Width of the pooled output."""
        return int(self._wrapped.config.hidden_size)


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
    """Read a head written by :func:`save_head` (or a learned merge's export).

    Raises CheckpointError if the file is missing or not a linear head.
    """
    try:
        tensors = load_file(str(path))
        weight, bias = tensors["weight"], tensors["bias"]
    except (OSError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"cannot read a task head: {err}", file=path,
                              fix="a head file holds 'weight' [classes, hidden] and 'bias'"
                              ) from None
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": bias})
    return head.eval()


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
