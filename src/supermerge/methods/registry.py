"""The method registry: registry name -> pure per-tensor function + typed parameters.

A method is a pure function over the tensors of ONE parameter name::

    fn(base, experts, params, models, ctx) -> merged tensor

``base`` is the base model's tensor (``None`` for methods that do not need one), ``experts``
the K fine-tuned tensors, all float32 and of one shape; ``params`` the method's global
parameters (a pydantic model), ``models`` one per-model parameter object per expert (at
least ``weight``), ``ctx`` the tensor's name, its seed and the result of the method's
whole-model statistic when it has one (TIES with ``trim_scope: model``). No I/O, no global
state: random methods build their own ``torch.Generator`` from ``ctx.seed``.

A method with ``state`` and ``resume`` (OPCM) can continue a merge: its output records the
whole-model state it needs, and a later merge enters that output as its first model with
the recorded state as that model's parameters (``supermerge.engine.merge_state``).

A method with ``per_task=True`` (TALL masks, EMR) returns a :class:`TaskSpecific` instead
of a tensor: one shared tensor plus, per task, a boolean mask and a scale, from which
task t's own tensor is rebuilt with the task id (:func:`task_tensor`). The engine writes
the shared tensors as the model and the masks beside it (``supermerge.engine.task_state``).

Adding a method is adding one module under ``supermerge.methods`` that calls
:func:`register`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import UnionType
from typing import Any, Literal, Protocol, Union, get_args, get_origin

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from supermerge.errors import MethodError, validation_details

DataNeed = Literal["none", "unlabelled", "labelled", "task id"]


class Params(BaseModel):
    """Base of a method's global parameters. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ModelParams(Params):
    """Per-model parameters. Every method accepts a weight per model."""

    weight: float = 1.0


@dataclass(frozen=True)
class TensorContext:
    """What a method may know about the tensor it merges besides its values."""

    name: str = ""
    seed: int = 0
    statistic: Any = None
    position: float = 0.0  # relative depth in [0, 1]: 0 at the first block, 1 at the last
    scratch: bool = False  # True: the method may overwrite the expert tensors (never the base)
    threads: int = 1  # threads the method may use for independent work (never changes a result)


class ModelStatistic(Protocol):
    """A whole-model quantity a method needs before it can merge any tensor.

    The engine streams every mergeable tensor's task vectors through ``observe`` for
    ``passes`` passes (calling ``finish_pass`` after each), then hands ``result()`` to the
    method in ``TensorContext.statistic``. Within a pass, tensors come in plan order and each
    tensor's task vectors arrive back to back, model 0 to K - 1.
    """

    passes: int

    def observe(self, pass_index: int, model_index: int, task_vector: torch.Tensor) -> None: ...

    def finish_pass(self, pass_index: int) -> None: ...

    def result(self) -> Any: ...


@dataclass(frozen=True)
class TaskSpecific:
    """What a ``per_task`` method returns for one tensor: a shared tensor and per-task state.

    Task t's tensor is ``base + scales[t] * masks[t] * (shared - base)`` (:func:`task_tensor`);
    ``shared`` alone is the model that serves every task. ``masks`` holds one boolean tensor
    of ``shared``'s shape per expert, in the experts' order; ``scales`` one float per expert,
    the same for every tensor of a model (a whole-model quantity such as EMR's rescalers).
    """

    shared: torch.Tensor
    masks: list[torch.Tensor]
    scales: tuple[float, ...]

    def task(self, base: torch.Tensor, index: int) -> torch.Tensor:
        """Return task ``index``'s tensor (see :func:`task_tensor`)."""
        return task_tensor(base, self.shared, self.masks[index], self.scales[index])


def task_tensor(
    base: torch.Tensor, shared: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Return ``base + scale * mask * (shared - base)`` in ``shared``'s dtype.

    With ``scale == 1`` this is exactly ``where(mask, shared, base)`` (no rounding); other
    scales are applied in float32 (float64 for float64 tensors). Cost: two temporaries.
    """
    if scale == 1:
        return torch.where(mask, shared, base.to(shared.dtype))
    low = base.to(torch.promote_types(shared.dtype, torch.float32))
    rebuilt = torch.add(low, shared.to(low.dtype) - low, alpha=scale)
    return torch.where(mask, rebuilt, low).to(shared.dtype)


MethodFn = Callable[
    [torch.Tensor | None, list[torch.Tensor], Any, list[Any], TensorContext],
    torch.Tensor | TaskSpecific,
]
StatisticFactory = Callable[[Any, list[Any]], ModelStatistic | None]


@dataclass(frozen=True)
class ParamInfo:
    """One parameter as shown by ``supermerge methods``."""

    name: str
    type: str
    default: Any
    per_model: bool
    description: str


@dataclass(frozen=True)
class Method:
    """A registered merge method. Call it on tensors: ``method(base, experts, **params)``."""

    name: str
    fn: MethodFn
    params: type[Params]
    model_params: type[ModelParams]
    summary: str
    paper: str
    needs: DataNeed = "none"
    needs_base: bool = True
    min_models: int = 1
    max_models: int | None = None
    statistic: StatisticFactory | None = None
    per_task: bool = False  # fn returns a TaskSpecific (shared tensor + per-task masks/scales)
    # coefficients c with ``merged = base + sum_i c_i tau_i`` under these parameters, or
    # None where the method is not linear in the task vectors (the search's fast path)
    linear_coefficients: Callable[[Any, list[Any]], list[float] | None] | None = None
    # a base model listed among the models goes first (mergekit's slerp: t = 0 is the base)
    base_first: bool = False
    # continual merging (OPCM): ``state`` turns the whole-model statistic's result into a
    # JSON record the engine writes beside the output (``merge_state.json``); ``resume``
    # turns that record back into the per-model parameters of the merged model when a
    # later merge enters it first, so the experts it holds are never read again
    state: Callable[[Any], dict[str, Any]] | None = None
    resume: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None

    # -- parameters -------------------------------------------------------------------
    def parameter_names(self) -> tuple[set[str], set[str]]:
        """Return (global names, per-model names), aliases included."""
        return _field_names(self.params), _field_names(self.model_params)

    def split_defaults(
        self, raw: Mapping[str, Any], where: str = "parameters"
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split top-level recipe parameters into (global, per-model defaults).

        Raises MethodError naming the unknown keys and listing the valid ones.
        """
        global_names, model_names = self.parameter_names()
        unknown = [key for key in raw if key not in global_names | model_names]
        if unknown:
            raise self._unknown(unknown, sorted(global_names | model_names), where)
        glob = {k: v for k, v in raw.items() if k in global_names}
        per_model = {k: v for k, v in raw.items() if k in model_names and k not in global_names}
        return glob, per_model

    def check_model_keys(self, raw: Mapping[str, Any], where: str) -> None:
        """Raise MethodError if a model's own parameters contain an unknown key."""
        _, model_names = self.parameter_names()
        unknown = [key for key in raw if key not in model_names]
        if unknown:
            raise self._unknown(unknown, sorted(model_names), where)

    def validate(
        self, params: Mapping[str, Any], models: Sequence[Mapping[str, Any]]
    ) -> tuple[Params, list[ModelParams]]:
        """Return typed (global, per-model) parameters; MethodError on any invalid value."""
        self.check_count(len(models))
        glob = self._build(self.params, params, "parameters")
        per_model = [
            self._build(self.model_params, m, f"models[{i}].parameters")
            for i, m in enumerate(models)
        ]
        return glob, per_model

    def check_count(self, k: int) -> None:
        """Raise MethodError if the method cannot merge ``k`` experts."""
        if k < self.min_models or (self.max_models is not None and k > self.max_models):
            wanted = (
                f"exactly {self.min_models}"
                if self.min_models == self.max_models
                else f"at least {self.min_models}"
                + (f" and at most {self.max_models}" if self.max_models else "")
            )
            raise MethodError(
                f"method '{self.name}' merges {wanted} model(s), got {k}",
                fix=f"list {wanted} model(s) under `models:`",
            )

    def describe(self) -> list[ParamInfo]:
        """Every parameter with its type, default and whether it is per model."""
        rows = []
        for model, per_model in ((self.params, False), (self.model_params, True)):
            for name, field in model.model_fields.items():
                rows.append(
                    ParamInfo(
                        name=field.alias or name,
                        type=_type_name(field.annotation),
                        default=field.get_default(call_default_factory=True),
                        per_model=per_model,
                        description=field.description or "",
                    )
                )
        return rows

    # -- calling on tensors -----------------------------------------------------------
    def __call__(
        self,
        base: torch.Tensor | None,
        experts: Sequence[torch.Tensor],
        *,
        weights: Sequence[float] | None = None,
        per_model: Sequence[Mapping[str, Any]] | None = None,
        seed: int = 0,
        name: str = "",
        position: float = 0.0,
        **params: Any,
    ) -> torch.Tensor | TaskSpecific:
        """Merge one tensor from Python; returns a float32 tensor of the base's shape.

        A ``per_task`` method returns a :class:`TaskSpecific` (float32 shared tensor, one
        mask and one scale per expert) instead.

        ``weights`` is a shortcut for ``per_model=[{"weight": w}, ...]``; ``params`` are the
        method's global parameters or defaults for per-model ones. A whole-model statistic,
        if the method needs one, is computed over this single tensor.
        """
        experts = [e.float() for e in experts]
        base = base.float() if base is not None else None
        if self.needs_base and base is None:
            raise MethodError(f"method '{self.name}' needs a base tensor", fix="pass base=...")
        glob, defaults = self.split_defaults(params, where="keyword arguments")
        rows = [dict(defaults) for _ in experts]
        if weights is not None:
            if len(weights) != len(experts):
                raise MethodError(
                    f"{len(weights)} weights for {len(experts)} experts",
                    fix="give one weight per expert",
                )
            for row, w in zip(rows, weights, strict=True):
                row["weight"] = w
        if per_model is not None:
            for i, (row, extra) in enumerate(zip(rows, per_model, strict=True)):
                self.check_model_keys(extra, f"per_model[{i}]")
                row.update(extra)
        typed, models = self.validate(glob, rows)
        statistic = None
        if self.statistic is not None:
            stat = self.statistic(typed, models)
            if stat is not None:
                for p in range(stat.passes):
                    for i, expert in enumerate(experts):
                        stat.observe(p, i, expert - base if base is not None else expert)
                    stat.finish_pass(p)
                statistic = stat.result()
        ctx = TensorContext(name=name, seed=seed, statistic=statistic, position=position)
        return self.fn(base, experts, typed, models, ctx)

    # -- helpers ----------------------------------------------------------------------
    def _build(self, model: type[Params], values: Mapping[str, Any], where: str) -> Any:
        return validated_params(self.name, model, values, where)

    def _unknown(self, unknown: list[str], valid: list[str], where: str) -> MethodError:
        return MethodError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} in {where} "
            f"for method '{self.name}'",
            fix=f"valid parameters: {', '.join(valid) or '(none)'}",
        )


def _type_name(annotation: Any) -> str:
    """'float', 'bool', or the choices of a Literal: 'tensor | model'."""
    if get_origin(annotation) is Literal:
        return " | ".join(str(choice) for choice in get_args(annotation))
    if get_origin(annotation) in (Union, UnionType):
        return " | ".join(_type_name(arg) for arg in get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _field_names(model: type[BaseModel]) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        names.add(name)
        if field.alias:
            names.add(field.alias)
    return names


_REGISTRY: dict[str, Method] = {}


def validated_params(method: str, model: type[BaseModel], values: Mapping[str, Any],
                     where: str = "parameters") -> Any:
    """Return ``values`` validated as ``model`` (coerced, defaults filled in); MethodError
    naming the method, ``where`` the values were given and every invalid value."""
    try:
        return model.model_validate(dict(values))
    except ValidationError as err:
        raise MethodError(
            f"invalid {where} for method '{method}': {validation_details(err, '(all)')}",
            fix=f"see `supermerge methods {method}` for valid values",
        ) from None


def register(method: Method) -> Method:
    """Add a method to the registry; returns it. Duplicate names are a programming error."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} registered twice")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    """Return the registered method; MethodError listing the valid names if unknown, led by
    the closest ones ("did you mean ...?", :func:`difflib.get_close_matches`)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise MethodError(
            f"unknown merge method {name!r}{hint}",
            fix=f"use one of: {', '.join(sorted(_REGISTRY))}",
        ) from None


def available_methods() -> list[Method]:
    """All registered methods, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
