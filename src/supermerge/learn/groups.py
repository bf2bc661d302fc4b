"""Merge groups: which parameter tensors share one learned coefficient per expert.

``tensor`` gives every tensor its own group (SuperMerge's and AdaMerging's layer-wise
default). ``block`` gives one group per transformer block, recognised by the first
``layers.N.``, ``layer.N.``, ``h.N.``, ``blocks.N.`` or ``block.N.`` in the name (the group
is named by the prefix up to the block number, e.g. ``bert.encoder.layer.3``); tensors
outside any block (embeddings, final norms, output layers) each keep a group of their own.
``task`` gives one group for the whole model (one coefficient per expert). ``row`` gives
every output row of every tensor its own group (``name[i]``; a 1-D tensor's entries, a 0-d
tensor one group): one coefficient per expert and output neuron, as many coefficients per
expert as the model has rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from supermerge.names import block_of

Granularity = Literal["tensor", "block", "task", "row"]
GRANULARITIES: tuple[Granularity, ...] = ("tensor", "block", "task", "row")



def assign_groups(names: Sequence[str], granularity: Granularity,
                  rows: Sequence[int] | None = None) -> tuple[list[str], list[int | slice]]:
    """Return (group names, group of each tensor name), groups in first-seen order.

    A tensor's group is an index, or for ``row`` the slice of its rows' groups (``rows``:
    each tensor's number of output rows, needed then).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "row":
        if rows is None or len(rows) != len(names):
            raise ValueError("row granularity needs each tensor's number of rows")
        group_names, slices = [], []
        for name, count in zip(names, rows, strict=True):
            slices.append(slice(len(group_names), len(group_names) + count))
            group_names += [f"{name}[{i}]" for i in range(count)]
        return group_names, slices
    groups: dict[str, int] = {}
    index: list[int | slice] = []
    for name in names:
        if granularity == "task":
            key = "all"
        elif granularity == "block":
            key = block_of(name) or name
        else:
            key = name
        index.append(groups.setdefault(key, len(groups)))
    return list(groups), index
