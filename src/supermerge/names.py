"""Tensor-name conventions shared by every layer: which transformer block a tensor is in.

A block is recognised by the first ``layers.N.``, ``layer.N.``, ``h.N.``, ``blocks.N.`` or
``block.N.`` in a tensor's name (Llama, BERT, GPT-2, ViT, ... naming).
"""

from __future__ import annotations

import re

_BLOCK = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+))\.")


def block_of(name: str) -> str | None:
    """Return the block a tensor belongs to, named by its prefix (``bert.encoder.layer.3``),
    or None outside the numbered blocks."""
    match = _BLOCK.match(name)
    return match.group(1) if match else None


def layer_index(name: str) -> int | None:
    """Return the block number in a tensor name (``model.layers.3.mlp`` -> 3), else None."""
    match = _BLOCK.match(name)
    return int(match.group(2)) if match else None
