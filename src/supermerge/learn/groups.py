"""Merge groups: which parameter tensors share one learned coefficient per expert.

``tensor`` gives every tensor its own group (SuperMerge's and AdaMerging's layer-wise
default). ``block`` gives one group per transformer block, recognised by the first
``layers.N.``, ``layer.N.``, ``h.N.``, ``blocks.N.`` or ``block.N.`` in the name (the group
is named by the prefix up to the block number, e.g. ``bert.encoder.layer.3``); tensors
outside any block (embeddings, final norms, output layers) each keep a group of their own.
``task`` gives one group for the whole model (one coefficient per expert).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from supermerge.names import block_of

Granularity = Literal["tensor", "block", "task"]
GRANULARITIES: tuple[Granularity, ...] = ("tensor", "block", "task")



def assign_groups(names: Sequence[str], granularity: Granularity) -> tuple[list[str], list[int]]:
    """Return (group names, group index of each tensor name), groups in first-seen order."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    groups: dict[str, int] = {}
    index = []
    for name in names:
        if granularity == "task":
            key = "all"
        elif granularity == "block":
            key = block_of(name) or name
        else:
            key = name
        index.append(groups.setdefault(key, len(groups)))
    return list(groups), index
