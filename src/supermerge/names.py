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


def layer_stack(name: str) -> tuple[str, int] | None:
    """Return ``(stack, index)`` for a tensor in a numbered block: the name's prefix up to
    the number (``model.layers.``, ``transformer.h.``, ``bert.encoder.layer.``) and the
    number; None outside the numbered blocks."""
    match = _BLOCK.match(name)
    if match is None:
        return None
    return match.group(1)[: match.start(2)], int(match.group(2))


def with_layer_index(name: str, index: int) -> str:
    """Return ``name`` with its block number replaced by ``index``
    (``model.layers.3.mlp.weight``, 7 -> ``model.layers.7.mlp.weight``); a name outside the
    numbered blocks is returned as it is."""
    match = _BLOCK.match(name)
    if match is None:
        return name
    return f"{name[: match.start(2)]}{index}{name[match.end(2):]}"


def _prefix_splits(name: str, most: int = 2) -> list[tuple[str, str]]:
    """Return ``(prefix, rest)`` splits of ``name`` at its first ``most`` dots, the empty
    prefix first: ``a.b.c`` -> ``("", "a.b.c"), ("a.", "b.c"), ("a.b.", "c")``."""
    splits, at = [("", name)], 0
    for _ in range(most):
        at = name.find(".", at) + 1
        if at == 0 or at == len(name):
            break
        splits.append((name[:at], name[at:]))
    return splits


def prefix_shift(reference: list[str], other: list[str]) -> tuple[str, str] | None:
    """Return ``(other_prefix, reference_prefix)`` such that most reference names missing
    from ``other`` are ``reference_prefix + rest`` there and ``other_prefix + rest`` in
    ``other`` (``("bert.", "")`` for a ``BertForSequenceClassification`` expert of a
    ``BertModel`` base), or None when no shift explains at least half of them, or when
    fewer than half of the reference names are missing (a few missing tensors are not a
    naming difference).

    Prefixes are at most two dotted components on either side. Cost: one pass over each
    list of names, no tensor read.
    """
    present = set(other)
    missing = [name for name in reference if name not in present]
    if not missing or 2 * len(missing) < len(reference):
        return None
    by_rest: dict[str, list[str]] = {}
    for name in other:
        for prefix, rest in _prefix_splits(name):
            by_rest.setdefault(rest, []).append(prefix)
    votes: dict[tuple[str, str], int] = {}
    for name in missing:
        pairs = {(other_prefix, ref_prefix) for ref_prefix, rest in _prefix_splits(name)
                 for other_prefix in by_rest.get(rest, ()) if other_prefix != ref_prefix}
        for pair in pairs:
            votes[pair] = votes.get(pair, 0) + 1
    if not votes:
        return None
    best = max(votes, key=lambda pair: (votes[pair], -len(pair[0]) - len(pair[1])))
    return best if 2 * votes[best] >= len(missing) else None


def shifted_name(name: str, shift: dict[str, str]) -> str | None:
    """Return ``name`` (a reference name) as the other model spells it under ``shift``
    (other prefix -> reference prefix; the first reference prefix ``name`` starts with
    wins, the longest first), or None when no reference prefix matches."""
    for other_prefix, ref_prefix in sorted(shift.items(), key=lambda kv: -len(kv[1])):
        if name.startswith(ref_prefix):
            return other_prefix + name[len(ref_prefix):]
    return None
