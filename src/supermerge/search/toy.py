"""A tiny synthetic merging problem with real trade-offs, for tests, examples and smoke runs.

Task t labels Gaussian inputs ``x`` (``width`` features) by ``argmax(x @ teacher_t)``. The
network is two linear layers, ``layers.0`` (width x width) and ``layers.1`` (classes x
width); expert t is the base with ``layers.1`` set to its teacher and ``layers.0`` nudged,
so each expert solves its own task and merging trades the tasks off against each other.
Everything is seeded and built in milliseconds; nothing is trained or downloaded.
"""

from __future__ import annotations

import torch
from torch import nn

from supermerge.learn import TaskData
from supermerge.search.evaluator import Evaluator, SearchTask
from supermerge.search.space import SearchSpace


class ToyNet(nn.Module):
    """Two linear layers named like transformer blocks (``layers.0``, ``layers.1``)."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(width, width), nn.Linear(width, classes)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits, [batch, classes]."""
        return self.layers[1](torch.relu(self.layers[0](x)) + x)


def toy_problem(
    tasks: int = 2, *, width: int = 16, classes: int = 4, examples: int = 64, seed: int = 0
) -> tuple[ToyNet, dict[str, dict[str, torch.Tensor]], list[SearchTask]]:
    """Return (module with the base weights, experts by task name, tasks); costs milliseconds."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    module = ToyNet(width, classes)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.1 * randn(*parameter.shape))
    base = {k: v.detach().clone() for k, v in module.state_dict().items()}
    experts, search_tasks = {}, []
    for t in range(tasks):
        name = f"task{t}"
        teacher = randn(classes, width)
        expert = {k: v.clone() for k, v in base.items()}
        expert["layers.1.weight"] = teacher
        expert["layers.0.weight"] = base["layers.0.weight"] + 0.05 * randn(width, width)
        experts[name] = expert
        inputs = randn(examples, width)
        labels = (inputs @ teacher.T).argmax(-1)
        search_tasks.append(SearchTask(name, TaskData(inputs, labels, f"toy:{name}")))
    return module, experts, search_tasks


def toy_evaluator(tasks: int = 2, *, seed: int = 0, **options: int) -> Evaluator:
    """Return an :class:`Evaluator` over :func:`toy_problem` (``options`` go to it).

    Picklable through ``functools.partial``: a scorer factory for process and Ray backends.
    """
    module, experts, search_tasks = toy_problem(tasks, seed=seed, **options)
    return Evaluator(module, module.state_dict(), experts, search_tasks)


def toy_space(tasks: int = 2, *, method: str = "task_arithmetic",
              bounds: dict[str, tuple[float, float]] | None = None,
              layer_groups: int = 1) -> SearchSpace:
    """Return a space over :func:`toy_problem`'s experts (by default their weights in [0, 1])."""
    recipe = {"merge_method": method, "base_model": "toy-base",
              "models": [f"task{t}" for t in range(tasks)]}
    return SearchSpace(recipe, bounds or {"weight": (0.0, 1.0)}, layer_groups)
