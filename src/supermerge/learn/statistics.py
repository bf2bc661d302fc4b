"""What Fisher merging and RegMean share: pairing experts with tasks, batching each task's
inputs, running an expert with its task's head, and assembling the merged state dict.

Both merges (:mod:`supermerge.learn.fisher`, :mod:`supermerge.learn.regmean`) run the module
forward over each expert's own task data (unlabelled: no labels are read), gather a
per-expert statistic and merge in one pass; nothing is trained.

Experts are matched to tasks by name (a task named like an expert uses that expert's
data); when the names do not match, by position. Both take the module (its architecture;
its own tensors fill in whatever an expert lacks, e.g. integer buffers), the experts as
state dicts (or lazy mappings such as ``CheckpointState``) and return the merged state
dict. Heads are never merged and are left out of the result (every task keeps its
expert's head, as in :func:`~supermerge.learn.model.prepare_experts`): with
``head_prefix`` the tensors under it are each expert's head and each expert runs with its
own; or ``heads`` gives each task's head (tensor overrides or a module applied to the
module's output). ``progress("statistics", done, total)`` is called after every batch, counting
examples over all experts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from supermerge.learn.data import Task, TaskData
from supermerge.learn.errors import LearnError
from supermerge.learn.model import Head, module_tensors, prepare_experts, run_with_head
from supermerge.learn.objectives import logits_of
from supermerge.progress import Progress

State = Mapping[str, torch.Tensor]
Weights = Mapping[str, float] | Sequence[float]

DEFAULT_EXAMPLES = 256
BATCH = 32


Pairing = tuple[str, Task, Head | None]


def prepare_pairs(
    module: nn.Module, experts: Mapping[str, State], tasks: Sequence[Task],
    head_prefix: str | None, heads: Mapping[str, Head] | None,
) -> tuple[list[str], list[Pairing], dict[str, str]]:
    """Check the experts; returns (merged names, (expert, task, head) triples, tied aliases).

    With ``head_prefix`` the head is None (the expert's own tensors hold it); with
    ``heads`` every task must have one.
    """
    if not experts:
        raise LearnError("no experts to merge", fix="give at least one expert")
    names, heads = prepare_experts(module, module.state_dict(), experts, head_prefix, heads)
    pairs = pair_experts(experts, tasks)
    aliases = module_tensors(module)[1]
    if head_prefix or not heads:
        return names, [(e, t, None) for e, t in pairs], aliases
    headless = [task.name for _e, task in pairs if task.name not in heads]
    if headless:
        raise LearnError(f"no head for task(s) {', '.join(map(repr, headless))}",
                         fix=f"give every task a head; heads given: {', '.join(heads)}")
    return names, [(e, t, heads[t.name]) for e, t in pairs], aliases


def pair_experts(experts: Mapping[str, State], tasks: Sequence[Task]) -> list[tuple[str, Task]]:
    """Match each expert with its task: by name, else by position."""
    by_name = {task.name: task for task in tasks}
    if all(name in by_name for name in experts):
        return [(name, by_name[name]) for name in experts]
    if len(tasks) != len(experts):
        missing = [name for name in experts if name not in by_name]
        raise LearnError(
            f"expert(s) {', '.join(map(repr, missing))} have no task: {len(experts)} "
            f"expert(s), {len(tasks)} task(s)",
            fix="name each task like its expert, or give one task per expert in order",
        )
    return list(zip(experts, tasks, strict=True))


def expert_weights(weights: Weights | None, names: list[str]) -> dict[str, float]:
    """Return each expert's weight (by name, or in ``names``' order; default 1); raises
    LearnError for a missing, extra or non-positive weight."""
    if weights is None:
        return dict.fromkeys(names, 1.0)
    if isinstance(weights, Mapping):
        missing = [n for n in names if n not in weights]
        if missing:
            raise LearnError(f"no weight for expert(s) {', '.join(map(repr, missing))}",
                             fix="give a weight per expert, by name")
        values = {n: float(weights[n]) for n in names}
    else:
        if len(weights) != len(names):
            raise LearnError(f"{len(weights)} weight(s) for {len(names)} expert(s)",
                             fix="give one weight per expert")
        values = {n: float(v) for n, v in zip(names, weights, strict=True)}
    if any(not v > 0 for v in values.values()):
        raise LearnError("expert weights must be positive", fix="use weights > 0")
    return values


class ExampleCounter:
    """Batches of each task's first ``examples`` inputs; reports examples done overall.

    Raises LearnError for ``examples`` below 1, and (from :meth:`batches`) for a task
    without examples.
    """

    def __init__(self, pairs: Sequence[Pairing], examples: int, size: int,
                 progress: Progress | None) -> None:
        if examples < 1:
            raise LearnError("examples must be at least 1", fix="use examples >= 1")
        self.examples, self.size, self.progress = examples, size, progress
        self.total = sum(min(examples, len(task.data)) for _e, task, _h in pairs)
        self.done = 0

    def batches(self, task: Task) -> Iterator[TaskData]:
        """Yield the batches of ``task``'s data; counts each once it has been processed."""
        data = task.data
        count = min(self.examples, len(data))
        if count == 0:
            raise LearnError(f"task {task.name!r} has no examples", file=data.source,
                             fix="give each task some unlabelled inputs")
        for start in range(0, count, self.size):
            batch = data.select(torch.arange(start, min(start + self.size, count)))
            yield batch
            self.done += len(batch)
            if self.progress is not None:
                self.progress("statistics", self.done, self.total)


def run_logits(module: nn.Module, state: dict[str, torch.Tensor], head: Head | None,
               batch: TaskData) -> torch.Tensor:
    """Return the logits of ``module`` run on ``state`` with ``head`` over ``batch``."""
    args, kwargs = batch.call_args()
    return logits_of(run_with_head(module, state, head, args, kwargs))


def attention_mask_of(batch: TaskData) -> torch.Tensor | None:
    """The batch's ``attention_mask`` input as booleans (None without one)."""
    mask = batch.inputs.get("attention_mask") if isinstance(batch.inputs, dict) else None
    return None if mask is None else mask.bool()


def finish_state(
    module: nn.Module, experts: Mapping[str, State], first: str,
    merged: dict[str, torch.Tensor], names: list[str], aliases: dict[str, str],
    head_prefix: str | None,
) -> dict[str, torch.Tensor]:
    """Add non-floating buffers (first expert's, else the module's) and tied aliases."""
    result: dict[str, torch.Tensor] = {}
    known = set(names)
    for name, tensor in module.state_dict().items():
        if head_prefix and name.startswith(head_prefix):
            continue
        if name in known:
            result[name] = merged[name]
        elif aliases.get(name) in known:
            result[name] = merged[aliases[name]]
        elif not tensor.is_floating_point():
            source = experts[first]
            result[name] = source.get(name, tensor).detach().clone()
    return result
