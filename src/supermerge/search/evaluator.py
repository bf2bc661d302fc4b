"""The Evaluator: score merge recipes on resident weights, never re-reading a checkpoint.

An :class:`Evaluator` reads the base and the K experts once into a
:class:`~supermerge.learn.MergedModel` (the module, the base and the K task vectors
stacked per tensor). A candidate recipe is then merged in memory and scored on the tasks'
validation data:

- ``task_arithmetic`` (and ``linear`` with normalised weights) is linear in the task
  vectors: its per-tensor coefficients become the MergedModel's coefficient matrix W and
  the merge is one ``base + W tau`` pass;
- any other data-free method of the registry runs per tensor on ``base`` and
  ``base + tau_i``, exactly as the streaming engine would run it on the checkpoints.

Parameter values are resolved per tensor (gradients over layers, filters) by the engine's
own rules, so the recipe written for the best candidate merges to the model that was
scored. A task's score is its metric on its validation split; the fitness is the mean.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from supermerge.engine.params import LayerPositions, TensorParameters
from supermerge.engine.plan import tensor_seed
from supermerge.errors import MethodError, RecipeError
from supermerge.learn import MergedModel, TaskData
from supermerge.learn import Task as LearnTask
from supermerge.learn.model import Head
from supermerge.learn.objectives import logits_of
from supermerge.learn.train import check_tasks
from supermerge.methods import Method, Params, TaskSpecific, TensorContext, get_method
from supermerge.search.space import Candidate

log = logging.getLogger(__name__)

Metric = Callable[[Sequence[int], Sequence[int]], float]
"""(predictions, labels) -> score, higher is better."""


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Return the fraction of predictions equal to their label (0.0 for none)."""
    if not labels:
        return 0.0
    return sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels)


@dataclass(frozen=True)
class SearchTask:
    """A task as a search scores it: labelled validation data and a metric.

    ``data`` holds the inputs (a tensor, or a dict of tensors passed as keyword arguments)
    and integer class labels; ``metric`` scores argmax predictions against the labels
    (an eval layer task's ``score`` fits). The task's head is found by its name.
    """

    name: str
    data: TaskData
    metric: Metric = accuracy
    batch_size: int = 64


@dataclass(frozen=True)
class Scores:
    """Each task's metric for one candidate; ``fitness`` is their mean."""

    per_task: dict[str, float]

    @property
    def fitness(self) -> float:
        """The mean of the per-task scores."""
        return sum(self.per_task.values()) / len(self.per_task)


class Scorer(Protocol):
    """What a search backend needs: something that scores candidates."""

    def score(self, candidate: Candidate) -> Scores:
        """Return the candidate's scores."""
        ...


ScorerFactory = Callable[[], Scorer]
"""Builds a scorer where it will run (a worker process, a Ray actor): must pickle."""


class Evaluator:
    """Scores candidate recipes on resident weights (see the module docstring).

    ``module`` is the architecture loaded with the base weights, ``base_state`` its base
    tensors (``module.state_dict()`` shares them), ``experts`` the fine-tuned models by name
    (state dicts or lazy :class:`~supermerge.learn.CheckpointState` views, read once), and
    ``heads`` / ``head_prefix`` each task's head as in
    :meth:`~supermerge.learn.MergedModel.from_experts`. Construction reads every expert
    tensor once and holds the base plus K task vectors in ``vector_dtype``; each
    :meth:`score` costs one merge (one pass over the task vectors; K extra tensor-sized
    temporaries at a time for non-linear methods) and one forward pass per
    ``batch_size`` validation examples of each task. Raises LearnError if a task has no
    head, no examples or labels its head cannot produce.
    """

    def __init__(
        self,
        module: nn.Module,
        base_state: Mapping[str, torch.Tensor],
        experts: Mapping[str, Mapping[str, torch.Tensor]],
        tasks: Sequence[SearchTask],
        *,
        heads: Mapping[str, Head] | None = None,
        head_prefix: str | None = None,
        vector_dtype: torch.dtype = torch.float32,
    ) -> None:
        device = next(iter(base_state.values())).device
        keep = _KeepStacks(vector_dtype, device)
        self.model = MergedModel.from_experts(
            module.eval(), base_state, experts, heads=heads, head_prefix=head_prefix,
            granularity="tensor", coefficient_map="identity", init=0.0,
            vector_dtype=vector_dtype, prepare=keep,
        )
        self.tasks = list(tasks)
        check_tasks(self.model, [LearnTask(t.name, t.data) for t in self.tasks])
        self.names = list(self.model.names)
        self._base = [base_state[name].detach() for name in self.names]
        self._stacks = keep.stacks
        if len(self._stacks) != len(self.names):  # MergedModel stacks once per merged tensor
            raise RuntimeError(f"kept {len(self._stacks)} task-vector stacks for "
                               f"{len(self.names)} merged tensors")
        layers = LayerPositions(self.names)
        self._positions = [layers.position(name) for name in self.names]

    @property
    def expert_names(self) -> list[str]:
        """The experts, in the order of a candidate's ``model_parameters``."""
        return list(self.model.expert_names)

    @torch.no_grad()
    def merged_weights(self, candidate: Candidate) -> dict[str, torch.Tensor]:
        """Return the merged tensors (name -> tensor, base dtype) for ``candidate``.

        Costs one pass over the resident task vectors. Raises MethodError or RecipeError
        for parameters the method refuses (as the engine would).
        """
        method = get_method(candidate.method)
        if len(candidate.model_parameters) != len(self._stacks[0]):
            raise RecipeError(f"{len(candidate.model_parameters)} models in the candidate, "
                              f"{len(self._stacks[0])} experts in the evaluator",
                              fix="list the evaluator's experts, in order: "
                              f"{', '.join(self.expert_names)}")
        typed = self._typed_parameters(method, candidate)
        coefficients = _linear_coefficients(method, typed)
        if coefficients is not None:
            self.model.set_weight(coefficients)
            return self.model.merged_parameters()
        statistic = self._statistic(method, typed)
        merged = {}
        for j, name in enumerate(self.names):
            base = self._base[j].float()
            experts = [base + vector.float() for vector in self._stacks[j]]
            ctx = TensorContext(name=name, seed=tensor_seed(candidate.seed, name),
                                statistic=statistic, position=self._positions[j], scratch=True)
            result = method.fn(base, experts, *typed[j], ctx)
            if isinstance(result, TaskSpecific):
                raise RecipeError(f"method '{method.name}' returns one model per task",
                                  fix="search a method that returns one model")
            merged[name] = result.to(self._base[j].dtype)
        return merged

    @torch.no_grad()
    def score(self, candidate: Candidate) -> Scores:
        """Merge ``candidate`` in memory and return each task's validation metric."""
        weights = self.merged_weights(candidate)
        return Scores({task.name: self._score_task(task, weights) for task in self.tasks})

    def _score_task(self, task: SearchTask, weights: Mapping[str, torch.Tensor]) -> float:
        predictions: list[int] = []
        n = len(task.data)
        for start in range(0, n, task.batch_size):
            part = task.data.select(torch.arange(start, min(n, start + task.batch_size)))
            args, kwargs = part.call_args()
            output = self.model(*args, task=task.name, weights=weights, **kwargs)
            predictions += logits_of(output).argmax(-1).tolist()
        return float(task.metric(predictions, task.data.labels.tolist()))

    def _typed_parameters(self, method: Method, candidate: Candidate
                          ) -> list[tuple[Params, list[Any]]]:
        """Each tensor's validated (global, per-model) parameters, resolved as the engine
        resolves them; validation runs once per distinct set of values."""
        resolver, problems = TensorParameters.from_recipe(method, candidate.parameters,
                                                          candidate.model_parameters)
        typed = []
        for name, position in zip(self.names, self._positions, strict=True):
            values, more = resolver.at(name, position)
            problems += more
            if problems:
                first = problems[0]
                raise RecipeError(first.message, tensor=first.tensor, fix=first.fix)
            typed.append(values)
        return typed

    def _statistic(self, method: Method, typed: list[tuple[Params, list[Any]]]) -> Any:
        """The method's whole-model statistic over the resident task vectors, if it has one."""
        if method.statistic is None:
            return None
        distinct = {repr(t): t for t in typed}
        stats = [method.statistic(*t) for t in distinct.values()]
        if all(stat is None for stat in stats):
            return None
        if len(distinct) > 1:
            raise MethodError(f"method '{method.name}' computes a whole-model statistic with "
                              "these parameters: they cannot vary between tensors",
                              fix="search with layer_groups: 1")
        stat = stats[0]
        for p in range(stat.passes):
            for stack in self._stacks:
                for i, vector in enumerate(stack):
                    stat.observe(p, i, vector.float())
            stat.finish_pass(p)
        return stat.result()


class _KeepStacks:
    """MergedModel's ``prepare`` hook that keeps each tensor's stacked task vectors.

    It returns the stack already in the model's dtype and on its device, so the model
    stores this very tensor: the evaluator reads the model's own copy, none of its own.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self.stacks: list[torch.Tensor] = []

    def __call__(self, stacked: torch.Tensor) -> torch.Tensor:
        stacked = stacked.to(device=self.device, dtype=self.dtype)
        self.stacks.append(stacked)
        return stacked


def _linear_coefficients(method: Method, typed: list[tuple[Params, list[Any]]]
                         ) -> torch.Tensor | None:
    """K x J coefficients c with ``merged = base + sum_i c[i, j] tau_i`` per tensor j, for
    the methods that are linear in the task vectors; None for the others."""
    if method.linear_coefficients is None:
        return None
    columns = [method.linear_coefficients(glob, models) for glob, models in typed]
    if any(column is None for column in columns):
        return None
    return torch.tensor(columns, dtype=torch.float64).T
