"""Per-tensor parameter values, written the way mergekit users write them.

A parameter value in a recipe is one of:

- a scalar: ``density: 0.5`` — the same for every tensor;
- a list of numbers: ``t: [0, 0.5, 1]`` — a *gradient*, interpolated linearly across the
  layer index (first value at layer 0, last at the last layer);
- a list of filters: ``t: [{filter: self_attn, value: 0.3}, {filter: mlp, value: 0.7},
  {value: 0.5}]`` — the first entry whose ``filter`` is a substring of the tensor name
  wins; an entry without ``filter`` matches everything. A filter's value may itself be a
  gradient.

Tensors outside the numbered blocks sit at position 0 when their name says they embed
(``embed``, ``wte``, ``wpe``) and at position 1 otherwise (final norm, output head).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from supermerge.errors import Problem
from supermerge.names import layer_index

_EMBED_HINTS = ("embed", "wte", "wpe")


class LayerPositions:
    """Relative depth in [0, 1] of each tensor, from the layer numbers found in the names."""

    def __init__(self, names: Iterable[str]) -> None:
        indices = [i for i in map(layer_index, names) if i is not None]
        self.num_layers = max(indices) + 1 if indices else 0

    def position(self, name: str) -> float:
        """Return 0 at the first block (and embeddings), 1 at the last (and the head)."""
        index = layer_index(name)
        if index is None:
            return 0.0 if any(h in name.lower() for h in _EMBED_HINTS) else 1.0
        return index / (self.num_layers - 1) if self.num_layers > 1 else 0.0


def is_tensor_dependent(spec: Any) -> bool:
    """True if the value differs between tensors (a gradient or a filter list)."""
    return isinstance(spec, list)


def resolve(spec: Any, name: str, position: float) -> Any:
    """Return the scalar value of ``spec`` for the tensor ``name`` at relative depth ``position``.

    Raises ValueError with a readable reason for a malformed spec (the planner turns it into
    a Problem naming the parameter).
    """
    if not isinstance(spec, list):
        return spec
    if not spec:
        raise ValueError("an empty list is not a value")
    if all(isinstance(item, Mapping) for item in spec):
        for item in spec:
            unknown = set(item) - {"filter", "value"}
            if unknown or "value" not in item:
                raise ValueError(
                    "each filter entry must be {filter: <substring>, value: <value>} "
                    f"(got keys {sorted(item)})"
                )
            if "filter" not in item or str(item["filter"]) in name:
                return resolve(item["value"], name, position)
        raise ValueError(
            f"no filter matches tensor {name!r}; add a final entry without `filter` as default"
        )
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in spec):
        return _interpolate([float(v) for v in spec], position)
    raise ValueError("a list value must be all numbers (a gradient) or all {filter, value} maps")


def _interpolate(values: list[float], position: float) -> float:
    if len(values) == 1:
        return values[0]
    x = position * (len(values) - 1)
    low = min(int(x), len(values) - 2)
    frac = x - low
    return values[low] + (values[low + 1] - values[low]) * frac


def resolve_all(
    specs: Mapping[str, Any], name: str, position: float, where: str
) -> tuple[dict[str, Any], list[Problem]]:
    """Resolve every parameter of one mapping for one tensor; malformed specs become Problems."""
    values, problems = {}, []
    for key, spec in specs.items():
        try:
            values[key] = resolve(spec, name, position)
        except ValueError as err:
            problems.append(
                Problem(f"parameter {key!r} in {where}: {err}", tensor=name,
                        fix="see the README's recipe format")
            )
    return values, problems
