"""Tiny seeded models and tasks shared by the learn tests (imported by them), and their checks.

Each task classifies 8-dim Gaussian inputs by ``argmax(x @ P_task)``; an expert is the base
MLP fine-tuned (body and its own head ``head.*``) on 256 examples of its task.

Modules importing ``one_thread`` run each test with one torch thread: on shared cores the
thread pool's busy-waiting makes these tiny models ten times slower.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

import pytest
import torch
from torch import nn

from supermerge.learn import MergedModel, Task, TaskData

DIM, HIDDEN, CLASSES = 8, 24, 3


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class MLP(nn.Module):
    """Body (two tanh layers) plus a linear head named ``head``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.body = nn.Sequential(
                nn.Linear(DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh()
            )
            self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def projection(task_seed: int, jitter_seed: int | None = None, jitter: float = 0.3) -> torch.Tensor:
    """The task's labelling matrix; a jittered copy makes a closely related task."""
    p = torch.randn(DIM, CLASSES, generator=torch.Generator().manual_seed(task_seed))
    if jitter_seed is not None:
        noise = torch.Generator().manual_seed(jitter_seed)
        p = p + jitter * torch.randn(DIM, CLASSES, generator=noise)
    return p


def examples(p: torch.Tensor, n: int, seed: int) -> TaskData:
    x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))
    return TaskData(x, (x @ p).argmax(1))


def finetune(base: MLP, data: TaskData, seed: int, steps: int = 150) -> dict[str, torch.Tensor]:
    """Return the state dict of ``base`` fine-tuned on ``data`` with a fresh head (seeded)."""
    model = MLP()
    model.load_state_dict(base.state_dict())
    model.head.load_state_dict(MLP(seed=seed).head.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(data.inputs), data.labels).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class Toy:
    """A base module (holding the base weights), experts, and per task validation/test data."""

    module: MLP
    experts: dict[str, dict[str, torch.Tensor]]
    projections: dict[str, torch.Tensor]
    val: dict[str, TaskData]
    test: dict[str, TaskData]

    @property
    def base_state(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def tasks(self, names: list[str] | None = None) -> list[Task]:
        return [Task(n, self.val[n]) for n in (names or list(self.val))]


def make_toy(projections: dict[str, torch.Tensor], *,
             val_size: int = 64, steps: int = 150, head_seeds: list[int] | None = None) -> Toy:
    """Fine-tune one expert per task from a shared random base (head i seeded 10 + i)."""
    base = MLP(seed=0)
    head_seeds = head_seeds or [10 + i for i in range(len(projections))]
    experts, val, test = {}, {}, {}
    for i, (name, p) in enumerate(projections.items()):
        experts[name] = finetune(base, examples(p, 256, seed=100 + i),
                                 seed=head_seeds[i], steps=steps)
        val[name] = examples(p, val_size, seed=200 + i)
        test[name] = examples(p, 512, seed=300 + i)
    return Toy(base, experts, dict(projections), val, test)


@cache
def two_task_toy() -> Toy:
    """Shared by many tests: never modify it."""
    return make_toy({"a": projection(1), "b": projection(2)})


@torch.no_grad()
def accuracy(model: MergedModel, task: str, data: TaskData) -> float:
    return (model(data.inputs, task=task).argmax(1) == data.labels).float().mean().item()


def mean_accuracy(model: MergedModel, toy: Toy) -> float:
    return sum(accuracy(model, t, toy.test[t]) for t in toy.test) / len(toy.test)


def test_experts_solve_their_tasks() -> None:
    toy = two_task_toy()
    for name, state in toy.experts.items():
        expert = MLP()
        expert.load_state_dict(state)
        data = toy.test[name]
        acc = (expert(data.inputs).argmax(1) == data.labels).float().mean().item()
        assert acc > 0.85, (name, acc)
