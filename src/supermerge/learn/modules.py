"""Modules that learned merges and evaluation share: a mean-pooled encoder, linear task
heads read from files, and the classifier they make together.

The "backbone + head file" layout: a task's expert is a Hugging Face encoder folder plus a
safetensors file holding its linear head (``weight`` [classes, hidden], ``bias``); the
classifier mean-pools the encoder's last hidden states over the real tokens and applies
the head. The benchmark's experts have this layout, and so may a user's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from supermerge.errors import CheckpointError


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
    def config(self) -> Any:
        """The wrapped model's transformers config."""
        return self._wrapped.config

    @property
    def hidden_size(self) -> int:
        """Width of the pooled output."""
        return int(self._wrapped.config.hidden_size)


def linear_head(tensors: Mapping[str, torch.Tensor], source: str | Path | None = None
                ) -> nn.Linear:
    """Return the linear head (eval mode) that ``tensors`` (``weight`` [classes, hidden],
    ``bias`` [classes]) hold; CheckpointError naming ``source`` otherwise."""
    weight, bias = tensors.get("weight"), tensors.get("bias")
    if weight is None or bias is None or weight.dim() != 2 or tuple(bias.shape) != (
            weight.shape[0],):
        raise CheckpointError(
            f"not a linear task head (tensors: {', '.join(sorted(tensors)) or 'none'})",
            file=source, fix="a head file holds 'weight' [classes, hidden] and 'bias' [classes]")
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": bias})
    return head.eval()


def read_linear_head(path: str | Path) -> nn.Linear:
    """Read a linear head file (:func:`linear_head`); CheckpointError if it is unreadable."""
    try:
        tensors = load_file(str(path))
    except (OSError, RuntimeError) as err:
        raise CheckpointError(f"cannot read a task head: {err}", file=path,
                              fix="a head file holds 'weight' [classes, hidden] and 'bias'"
                              ) from None
    return linear_head(tensors, path)


@dataclass
class ClassifierOutput:
    """What :class:`PooledClassifier` returns: ``logits`` [batch, classes]."""

    logits: torch.Tensor


class PooledClassifier(nn.Module):
    """A mean-pooled encoder and a task's linear head, answering like a transformers
    classifier: ``model(input_ids=..., attention_mask=...).logits``; ``config`` is the
    encoder's with ``num_labels`` and, when known, ``id2label``."""

    def __init__(self, encoder: MeanPooledEncoder, head: nn.Linear, config: Any) -> None:
        super().__init__()
        self.encoder, self.head, self.config = encoder, head, config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> ClassifierOutput:
        """Return the logits of the task's classes; costs one encoder forward pass."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return ClassifierOutput(self.head(self.encoder(input_ids, attention_mask, **kwargs)))
