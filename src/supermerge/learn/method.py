"""What every learned method is: its description, parameters, data and one way to run it.

A learned method (SuperMerge, AdaMerging, Fisher, RegMean, ...) lives in its own module,
which describes it as a :class:`LearnedMethod` and calls :func:`register`; the workflows
(`supermerge learn`, the benchmark, data-parallel runs) look methods up by name
(:func:`get_learned_method` in :mod:`supermerge.learn.registry`) and call
:meth:`LearnedMethod.run`, never a method by its name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from supermerge.errors import MethodError
from supermerge.learn.data import Task
from supermerge.learn.memory import PeakRSS
from supermerge.learn.model import Head, expert_heads
from supermerge.learn.objectives import make_objective
from supermerge.learn.train import DataParallel
from supermerge.methods.registry import DataNeed, Method, Params, validated_params
from supermerge.progress import Progress

if TYPE_CHECKING:
    from supermerge.learn.hierarchical import LearnedMerge

State = Mapping[str, torch.Tensor]


@dataclass
class LearnedOutcome:
    """What a learned method produced.

    ``state`` is the module's state dict with the merged tensors (the module's own head
    tensors stay the base's); ``heads`` each task's head tensors; ``merge`` the learned
    coefficients and merge tree of methods that train (None for closed forms);
    ``peak_rss`` the measured RSS rise in bytes; ``files`` what the method writes beside
    the model (name -> text or bytes, e.g. Twin-Merging's router) and ``notes`` markdown
    for the model card.
    """

    state: dict[str, torch.Tensor]
    heads: dict[str, dict[str, torch.Tensor]]
    merge: LearnedMerge | None
    peak_rss: int
    files: dict[str, str | bytes] = field(default_factory=dict)
    notes: str = ""


@dataclass
class ClosedForm:
    """What a closed-form merge returns when it writes more than the merged tensors:
    ``files`` and ``notes`` as in :class:`LearnedOutcome`."""

    tensors: dict[str, torch.Tensor]
    files: dict[str, str | bytes] = field(default_factory=dict)
    notes: str = ""


Run = Callable[..., LearnedOutcome]
"""``run(module, experts, tasks, *, head_prefix=None, heads=None, progress=None,
parallel=None, workdir=None, **params)``: the module loaded with the base weights, the
experts by name (lazy mappings welcome), the tasks with their data; returns the outcome.
Methods that train also take ``base_state`` (default: the module's own weights)."""


class _NoModelParams(Params):
    """Learned methods take no per-model parameters unless they say so."""


@dataclass(frozen=True)
class LearnedMethod:
    """A data-driven method: how `supermerge methods` lists it and how it is run.

    ``trains`` says whether it learns coefficients by gradient steps (then `supermerge
    learn` reads ``TRAINED_EXAMPLES`` per task by default and the benchmark may shorten its
    ``steps``) or merges in closed form from statistics (reading its ``examples``
    parameter's worth). ``parallel`` says whether it runs data-parallel over
    torch.distributed.
    """

    name: str
    summary: str
    paper: str
    needs: DataNeed
    params: type[Params]
    run: Run
    trains: bool = True
    parallel: bool = False
    model_params: type[Params] = _NoModelParams
    needs_base: bool = True
    min_models: int = 1
    max_models: int | None = None

    describe = Method.describe  # the registry's listing: it reads params and model_params

    def data_needed(self, params: Params) -> DataNeed:
        """The data a run with these (validated) parameters reads: labelled when its
        objective reads labels, else the method's ``needs``."""
        objective = getattr(params, "objective", None)
        if objective is not None and make_objective(objective).needs_labels:
            return "labelled"
        return self.needs

    def validate(self, raw: Mapping[str, Any]) -> Any:
        """Return the typed parameters; MethodError naming every invalid value."""
        return typed_params(self.name, self.params, raw)


def typed_params(name: str, params_type: type[Params], raw: Mapping[str, Any]) -> Any:
    """Return ``raw`` validated as ``params_type`` (values coerced, defaults filled in);
    MethodError naming method ``name`` and every invalid value."""
    return validated_params(name, params_type, raw)


TRAINED_EXAMPLES = 32
"""Examples read per task by default for methods that train (``LearnedMethod.trains``)."""

_REGISTRY: dict[str, LearnedMethod] = {}


def register(method: LearnedMethod) -> LearnedMethod:
    """Add a learned method to the registry; returns it. A repeated name is a programming
    error."""
    if method.name in _REGISTRY:
        raise ValueError(f"learned method {method.name!r} registered twice")
    _REGISTRY[method.name] = method
    return method


def registered() -> dict[str, LearnedMethod]:
    """The learned methods registered so far, by name (see :mod:`supermerge.learn.registry`
    for all of them)."""
    return dict(_REGISTRY)


def lookup(name: str) -> LearnedMethod:
    """Return the registered learned method; MethodError with the closest names if unknown."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise MethodError(f"unknown learned method {name!r}{hint}",
                          fix=f"use one of: {', '.join(sorted(_REGISTRY))}") from None


def trained_run(train: Callable[..., LearnedMerge]) -> Run:
    """Return the :data:`Run` of a method that trains coefficients on a
    :class:`~supermerge.learn.model.MergedModel` (``train(module, base_state, experts,
    tasks, ...) -> LearnedMerge``), the base being the module's own weights."""

    def run(module: nn.Module, experts: Mapping[str, State], tasks: Sequence[Task], *,
            base_state: State | None = None, head_prefix: str | None = None,
            heads: Mapping[str, Head] | None = None, progress: Progress | None = None,
            parallel: DataParallel | None = None, workdir: Any = None,
            **params: Any) -> LearnedOutcome:
        base = module.state_dict() if base_state is None else base_state
        merge = train(module, base, experts, tasks, head_prefix=head_prefix, heads=heads,
                      progress=progress, parallel=parallel, workdir=workdir, **params)
        return LearnedOutcome(merge.model.merged_state_dict(), merge.model.head_state_dicts(),
                              merge, merge.peak_rss)

    return run


def closed_form_run(name: str,
                    merge: Callable[..., dict[str, torch.Tensor] | ClosedForm],
                    params_type: type[Params]) -> Run:
    """Return the :data:`Run` of closed-form method ``name`` (``merge(module, experts, tasks,
    ...) -> merged tensors``, or a :class:`ClosedForm` with files to write beside them;
    no coefficients are trained, though a method may fit a side module): its parameters
    are typed by ``params_type`` first (keywords it does not declare, such as fisher's
    per-expert ``weights``, pass through); the module's other tensors and the experts'
    heads (under ``head_prefix``, or ``heads`` as given) complete the outcome; the peak
    RSS rise is measured around the merge."""

    def run(module: nn.Module, experts: Mapping[str, State], tasks: Sequence[Task], *,
            head_prefix: str | None = None, heads: Mapping[str, Head] | None = None,
            progress: Progress | None = None, parallel: DataParallel | None = None,
            workdir: Any = None, **params: Any) -> LearnedOutcome:
        if parallel is not None:
            raise MethodError("this method has no data-parallel mode",
                              fix="run it in one process")
        fields = {key for n, f in params_type.model_fields.items() for key in (n, f.alias)}
        declared = {k: v for k, v in params.items() if k in fields}
        undeclared = {k: v for k, v in params.items() if k not in fields}
        options = {**undeclared, **typed_params(name, params_type, declared).model_dump()}
        with PeakRSS() as memory:
            merged = merge(module, experts, tasks, head_prefix=head_prefix, heads=heads,
                           progress=progress, **options)
        extra = merged if isinstance(merged, ClosedForm) else ClosedForm(merged)
        tensor_heads = expert_heads(experts, head_prefix) if head_prefix else {
            task: dict(head.state_dict()) if isinstance(head, nn.Module) else dict(head)
            for task, head in (heads or {}).items()}
        return LearnedOutcome({**module.state_dict(), **extra.tensors}, tensor_heads, None,
                              memory.peak, extra.files, extra.notes)

    return run
