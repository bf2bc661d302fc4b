"""Recipe spaces: which parameters of a merge recipe a search varies, and within which bounds.

A space is a normal recipe (method, base model, models, fixed parameters) plus a
``search`` block::

    merge_method: ties
    base_model: ./base
    models: [./expert-spam, ./expert-topic]
    parameters: {lambda: 1.0}          # fixed values
    search:
      parameters:                      # searched: [low, high]
        weight: [0.0, 1.0]             # a per-model parameter: one dimension per model
        density: [0.1, 1.0]
      layer_groups: 1                  # > 1: that many values per parameter and model,
                                       # interpolated across the layers (a recipe gradient)
      tasks: [sms_spam, rt_sentiment]  # what to score on (resolved by the caller)

A per-model parameter (``weight``, ``density``, ...) gets one dimension per model and
layer group, a global one (``lambda``) one per layer group. With ``layer_groups`` G > 1
each value becomes a gradient ``[v_0, ..., v_{G-1}]``, which the engine interpolates
linearly across the layer index: every point of the space is a recipe the engine merges
exactly as the search scored it. Searches work in the unit cube ``[0, 1]^D``;
:meth:`SearchSpace.values` maps a unit point to parameter values.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from supermerge.errors import RecipeError
from supermerge.methods import Method, get_method
from supermerge.recipes.recipe import load_yaml

_SEARCH_KEYS = ("parameters", "layer_groups", "tasks", "max_length")


@dataclass(frozen=True)
class Dimension:
    """One searched number: a parameter, its model (None: global), its layer group, bounds."""

    parameter: str
    model: int | None
    group: int
    low: float
    high: float
    label: str


@dataclass(frozen=True)
class Candidate:
    """One point of a space as the evaluators see it: a method and its recipe parameters.

    ``parameters`` are the recipe's top-level parameters, ``model_parameters`` each
    model's own (values may be gradients over the layers); ``values`` the searched
    numbers in the space's dimension order.
    """

    method: str
    parameters: dict[str, Any]
    model_parameters: list[dict[str, Any]]
    values: tuple[float, ...] = ()
    seed: int = 0


@dataclass
class SearchSpace:
    """A recipe with some of its parameters searched (see the module docstring).

    ``recipe`` is a recipe mapping (``merge_method``, ``base_model``, ``models``,
    ``parameters``, any other recipe keys); ``bounds`` maps each searched parameter to
    ``(low, high)``. Raises RecipeError for an empty space, unknown parameters, empty or
    non-finite bounds, and methods a search cannot score (data-driven, per-task);
    MethodError for bounds the method refuses (e.g. a density above 1).
    """

    recipe: dict[str, Any]
    bounds: dict[str, tuple[float, float]]
    layer_groups: int = 1
    dimensions: list[Dimension] = field(init=False)

    def __post_init__(self) -> None:
        self.recipe = dict(self.recipe)
        self.method = _searchable_method(self.recipe)
        self.models = _model_entries(self.recipe)
        self.method.check_count(len(self.models))
        if not self.bounds:
            raise RecipeError("the search space is empty: no parameter to search",
                              fix="list parameters under search.parameters, e.g. "
                              "{weight: [0.0, 1.0]}")
        if not isinstance(self.layer_groups, int) or self.layer_groups < 1:
            raise RecipeError(f"layer_groups must be a whole number >= 1, got "
                              f"{self.layer_groups!r}", fix="use 1 for one value per model")
        global_names, model_names = self.method.parameter_names()
        self.bounds = {name: _bounds(name, spec) for name, spec in self.bounds.items()}
        unknown = [n for n in self.bounds if n not in global_names | model_names]
        if unknown:
            raise RecipeError(
                f"unknown parameter(s) {', '.join(map(repr, unknown))} to search for method "
                f"'{self.method.name}'",
                fix=f"valid parameters: {', '.join(sorted(global_names | model_names))}")
        self._global = {n for n in self.bounds if n in global_names}
        self.dimensions = self._dimensions()
        for corner in (0.0, 1.0):  # the method must accept both ends of every range
            point = self.candidate(np.full(len(self), corner))
            self.method.validate(
                {k: _first(v) for k, v in point.parameters.items() if k in self.bounds},
                [{k: _first(v) for k, v in m.items() if k in self.bounds}
                 for m in point.model_parameters])

    # -- construction from a document ----------------------------------------------------
    @classmethod
    def from_document(cls, document: Mapping[str, Any],
                      source: str = "search space") -> tuple[SearchSpace, dict[str, Any]]:
        """Build a space from a recipe with a ``search`` block; returns it and the block's
        other settings (``tasks``, ``max_length``) for the caller. RecipeError if malformed."""
        if not isinstance(document, Mapping) or not isinstance(document.get("search"), Mapping):
            raise RecipeError(f"{source} has no `search:` block", file=source,
                              fix="add search: {parameters: {weight: [0.0, 1.0]}}")
        block = dict(document["search"])
        unknown = [k for k in block if k not in _SEARCH_KEYS]
        if unknown:
            raise RecipeError(f"unknown key(s) {', '.join(map(repr, unknown))} in `search:`",
                              file=source, fix=f"valid keys: {', '.join(_SEARCH_KEYS)}")
        bounds = block.pop("parameters", None)
        if not isinstance(bounds, Mapping):
            raise RecipeError("search.parameters must map parameter names to [low, high]",
                              file=source, fix="e.g. parameters: {weight: [0.0, 1.0]}")
        recipe = {k: v for k, v in document.items() if k != "search"}
        space = cls(recipe, dict(bounds), block.pop("layer_groups", 1))
        return space, block

    # -- the cube ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.dimensions)

    @property
    def labels(self) -> list[str]:
        """A readable name per dimension, e.g. ``weight[spam]``, ``lambda@2``."""
        return [d.label for d in self.dimensions]

    def values(self, unit: Sequence[float]) -> np.ndarray:
        """Map a point of ``[0, 1]^D`` (clipped into it) to parameter values."""
        unit = np.clip(np.asarray(unit, dtype=float), 0.0, 1.0)
        low = np.array([d.low for d in self.dimensions])
        high = np.array([d.high for d in self.dimensions])
        return low + unit * (high - low)

    def unit(self, values: Sequence[float]) -> np.ndarray:
        """Map parameter values back into ``[0, 1]^D`` (the inverse of :meth:`values`)."""
        low = np.array([d.low for d in self.dimensions])
        high = np.array([d.high for d in self.dimensions])
        return (np.asarray(values, dtype=float) - low) / (high - low)

    def candidate(self, unit: Sequence[float]) -> Candidate:
        """The recipe parameters at a unit point, ready for an evaluator."""
        return self.candidate_at(self.values(unit))

    def candidate_at(self, values: Sequence[float]) -> Candidate:
        """The recipe parameters at parameter ``values`` (not clipped to the bounds)."""
        values = tuple(float(v) for v in values)
        recipe = self.recipe_at(values)
        glob, shared = self.method.split_defaults(recipe["parameters"])
        models = [{**shared, **m["parameters"]} for m in recipe["models"]]
        return Candidate(self.method.name, glob, models, values, int(recipe.get("seed", 0)))

    def recipe_at(self, values: Sequence[float]) -> dict[str, Any]:
        """Return the complete recipe (a plain mapping, YAML-ready) at parameter ``values``."""
        if len(values) != len(self):
            raise ValueError(f"{len(values)} values for a {len(self)}-dimensional space")
        per_key: dict[tuple[str, int | None], list[float]] = {}
        for dim, value in zip(self.dimensions, values, strict=True):
            per_key.setdefault((dim.parameter, dim.model), []).append(float(value))
        recipe = json.loads(json.dumps(self.recipe))  # a deep copy of plain data
        recipe["models"] = [dict(m, parameters=dict(m.get("parameters", {})))
                            for m in self.models]
        parameters = dict(recipe.get("parameters") or {})
        for (name, model), group_values in per_key.items():
            value = group_values[0] if len(group_values) == 1 else group_values
            if model is None:
                parameters[name] = value
            else:
                parameters.pop(name, None)  # a searched per-model value beats a default
                recipe["models"][model]["parameters"][name] = value
        recipe["parameters"] = parameters
        return recipe

    def fingerprint(self) -> str:
        """SHA-256 of the recipe, the bounds and the groups: what a saved search depends on."""
        payload = {"recipe": self.recipe, "bounds": self.bounds, "groups": self.layer_groups}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()
                              ).hexdigest()

    def _dimensions(self) -> list[Dimension]:
        names = [_short(m["model"]) for m in self.models]
        dims = []
        for parameter, (low, high) in self.bounds.items():
            owners: list[int | None] = (
                [None] if parameter in self._global else list(range(len(self.models))))
            for model in owners:
                for group in range(self.layer_groups):
                    label = parameter if model is None else f"{parameter}[{names[model]}]"
                    if self.layer_groups > 1:
                        label += f"@{group}"
                    dims.append(Dimension(parameter, model, group, low, high, label))
        return dims


def load_space(path: str | Path) -> tuple[SearchSpace, dict[str, Any]]:
    """Read a YAML space file; returns the space and its search settings (see
    :meth:`SearchSpace.from_document`). Model paths stay as written."""
    return SearchSpace.from_document(load_yaml(path, "search space"), str(path))


def _searchable_method(recipe: Mapping[str, Any]) -> Method:
    name = recipe.get("merge_method")
    if not isinstance(name, str):
        raise RecipeError("the recipe names no merge_method", fix="add merge_method: ties")
    method = get_method(name)
    if method.needs != "none":
        raise RecipeError(f"method '{name}' needs {method.needs} data: a recipe search scores "
                          "data-free merges", fix="learn it with `supermerge learn`, or search "
                          "a data-free method")
    if method.per_task:
        raise RecipeError(f"method '{name}' builds one model per task; a search scores one "
                          "merged model", fix="search a method that returns one model")
    if method.needs_base and not recipe.get("base_model"):
        raise RecipeError(f"method '{name}' needs a base_model", fix="add base_model: <path>")
    return method


def _model_entries(recipe: Mapping[str, Any]) -> list[dict[str, Any]]:
    models = recipe.get("models")
    if not isinstance(models, list) or not models:
        raise RecipeError("the recipe lists no models", fix="list the experts under models:")
    entries = []
    for i, m in enumerate(models):
        entry = {"model": m} if isinstance(m, str) else dict(m)
        if not isinstance(entry.get("model"), str):
            raise RecipeError(f"models[{i}] names no model path", fix="- model: ./expert")
        base = recipe.get("base_model")
        if base and Path(entry["model"]).resolve() == Path(base).resolve():
            raise RecipeError(f"models[{i}] is the base model", fix="list only the experts "
                              "under models: (the base's task vector is zero)")
        entries.append(entry)
    return entries


def _bounds(name: str, spec: Any) -> tuple[float, float]:
    if isinstance(spec, Mapping):
        spec = (spec.get("low"), spec.get("high"))
    if (not isinstance(spec, Sequence) or isinstance(spec, str) or len(spec) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in spec)):
        raise RecipeError(f"bounds of {name!r} must be [low, high], got {spec!r}",
                          fix=f"e.g. {name}: [0.0, 1.0]")
    low, high = float(spec[0]), float(spec[1])
    if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
        raise RecipeError(f"bounds of {name!r} are empty or not finite: [{low}, {high}]",
                          fix="give finite bounds with low < high (fix a value instead under "
                          "the recipe's parameters)")
    return low, high


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) else value


def _short(path: str) -> str:
    return Path(path).name or str(path)
