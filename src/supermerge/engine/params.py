"""Per-tensor parameter values, written the way mergekit users write them.

A parameter value in a recipe is one of:

- a scalar: ``density: 0.5`` — the same for every tensor;
- a list of numbers: ``t: [0, 0.5, 1]`` — a *gradient*, interpolated linearly across the
  layer index (first value at layer 0, last at the last layer);
- a list of filters: ``t: [{filter: self_attn, value: 0.3}, {filter: mlp, value: 0.7},
  {value: 0.5}]`` — the first entry whose ``filter`` is a substring of the tensor name
  wins; an entry without ``filter`` (or with ``filter: "*"``) matches everything. A filter's
  value may itself be a gradient. A single ``{filter, value}`` map is a one-entry list.
  When no entry matches, the parameter is *unset* for that tensor (mergekit's rule): a
  model's own value falls back to the recipe's ``parameters``, and those to the method's
  default;
- a list of strings (or of booleans): the entry at index ``int(position * (n - 1))`` (mergekit's
  rule for values that cannot be interpolated).

Tensors outside the numbered blocks sit at position 0 when their name says they embed
(``embed``, ``wte``, ``wpe``) and at position 1 otherwise (final norm, output head).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from supermerge.errors import MethodError, Problem
from supermerge.methods import Method
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


class _Unset:
    """The value of a filter list none of whose filters matches the tensor."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
"""Returned by :func:`resolve` when no filter matches: the parameter is not set here."""


def is_tensor_dependent(spec: Any) -> bool:
    """True if the value differs between tensors (a gradient or a filter list)."""
    return isinstance(spec, list) or _is_filter_entry(spec)


def _is_filter_entry(spec: Any) -> bool:
    return isinstance(spec, Mapping) and "value" in spec and set(spec) <= {"filter", "value"}


def resolve(spec: Any, name: str, position: float) -> Any:
    """Return the scalar value of ``spec`` for the tensor ``name`` at relative depth ``position``.

    Returns :data:`UNSET` when ``spec`` is a filter list none of whose filters matches.
    Raises ValueError with a readable reason for a malformed spec (the planner turns it into
    a Problem naming the parameter).
    """
    if _is_filter_entry(spec):
        spec = [spec]
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
            pattern = item.get("filter")
            if pattern is None or pattern == "*" or str(pattern) in name:
                return resolve(item["value"], name, position)
        return UNSET
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in spec):
        return _interpolate([float(v) for v in spec], position)
    if all(isinstance(v, str) for v in spec) or all(isinstance(v, bool) for v in spec):
        return spec[int(position * (len(spec) - 1))]
    raise ValueError("a list value must be all numbers (a gradient), all strings or all "
                     "booleans (picked by depth), or all {filter, value} maps")


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
    """Resolve every parameter of one mapping for one tensor; malformed specs become Problems.

    A parameter whose filters all miss the tensor is left out (the method's default, or a
    fallback layer, applies: see :func:`resolve_layers`).
    """
    values, problems = {}, []
    for key, spec in specs.items():
        try:
            value = resolve(spec, name, position)
            if value is not UNSET:
                values[key] = value
        except ValueError as err:
            problems.append(
                Problem(f"parameter {key!r} in {where}: {err}", tensor=name,
                        fix="see the README's recipe format")
            )
    return values, problems


def resolve_layers(
    layers: Sequence[tuple[Mapping[str, Any], str]], name: str, position: float
) -> tuple[dict[str, Any], list[Problem]]:
    """Resolve stacked parameter mappings, first layer first: a key takes its value from the
    first layer that sets it for this tensor (a model's own parameters, then the recipe's
    ``parameters``), as mergekit looks parameters up. Each layer is ``(specs, where)``."""
    values: dict[str, Any] = {}
    problems: list[Problem] = []
    for specs, where in reversed(layers):
        layer, found = resolve_all(specs, name, position, where)
        values.update(layer)
        problems.extend(found)
    return values, problems


class TensorParameters:
    """A method's parameters as a recipe gives them, resolved for any tensor: the one place
    the engine's plan and the search's evaluator turn recipe values into the method's
    typed parameters.

    Built by :meth:`from_recipe`; :meth:`at` returns one tensor's validated (global,
    per-model) parameters. Validation runs once per distinct set of values.
    """

    def __init__(self, method: Method,
                 global_layers: Sequence[tuple[Mapping[str, Any], str]],
                 model_layers: Sequence[Sequence[tuple[Mapping[str, Any], str]]]) -> None:
        self.method = method
        self.global_layers = list(global_layers)
        self.model_layers = [list(layers) for layers in model_layers]
        self._validated: dict[str, tuple[Any, list[Any]] | None] = {}

    @property
    def global_specs(self) -> dict[str, Any]:
        """The global parameters' specs, a key from the first layer that sets it."""
        merged: dict[str, Any] = {}
        for specs, _where in reversed(self.global_layers):
            merged.update(specs)
        return merged

    @classmethod
    def from_recipe(cls, method: Method, parameters: Mapping[str, Any],
                    model_parameters: Sequence[Mapping[str, Any]],
                    model_names: Sequence[str] | None = None, *,
                    over: tuple[Mapping[str, Any], str] | None = None,
                    models_key: str = "models",
                    ) -> tuple[TensorParameters, list[Problem]]:
        """Split the recipe's ``parameters`` into the method's global ones and defaults of
        the per-model ones, and stack each model's own over those defaults (mergekit's
        lookup). ``over`` is ``(parameters, where)`` stacked between the models' own and the
        recipe's (a slice's ``parameters``); ``models_key`` names the models' list in
        messages. Returns the resolver and the unknown keys as problems (``model_names``
        name the models in them). Costs nothing: no tensor is read."""
        problems: list[Problem] = []
        global_layers, default_layers = [], []
        for raw, where in [*([over] if over else []), (parameters, "parameters")]:
            try:
                global_specs, defaults = method.split_defaults(raw, where)
            except MethodError as err:
                problems.append(Problem(err.message, fix=err.fix))
                global_specs, defaults = {}, {}
            global_layers.append((global_specs, where))
            default_layers.append((defaults, where))
        layers = []
        for i, own in enumerate(model_parameters):
            where = f"{models_key}[{i}]" + (f" ({model_names[i]})" if model_names else "")
            try:
                method.check_model_keys(own, where)
            except MethodError as err:
                problems.append(Problem(err.message, fix=err.fix))
            layers.append([(own, f"{models_key}[{i}].parameters"), *default_layers])
        return cls(method, global_layers, layers), problems

    def at(self, name: str, position: float) -> tuple[tuple[Any, list[Any]] | None,
                                                      list[Problem]]:
        """Return tensor ``name``'s validated (global, per-model) parameters at relative
        depth ``position``, or None with the problems when a value is malformed or the
        method refuses it (a refusal is reported at the first tensor that has it)."""
        glob, problems = resolve_layers(self.global_layers, name, position)
        rows = []
        for layers in self.model_layers:
            values, more = resolve_layers(layers, name, position)
            problems.extend(more)
            rows.append(values)
        key = repr((sorted(glob.items()), [sorted(r.items()) for r in rows]))
        if key not in self._validated:
            try:
                self._validated[key] = self.method.validate(glob, rows)
            except MethodError as err:
                problems.append(Problem(err.message, tensor=name, fix=err.fix))
                self._validated[key] = None
        return self._validated[key], problems
