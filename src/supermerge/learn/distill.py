"""What distillation from the experts needs: the blocks' hidden states and the experts' outputs.

:func:`captured_blocks` records the output of every numbered transformer block (``layers.N``,
``layer.N``, ``h.N``, ``blocks.N``, ``block.N``: :mod:`supermerge.names`) during a forward
pass. :func:`attach_teachers` runs each task's expert once on the task's examples and stores
its logits (at the scored positions) and its blocks' states in the task's data, so that the
training loop never runs an expert again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from supermerge.learn.data import Task
from supermerge.learn.model import (
    Head,
    check_task_experts,
    eval_mode,
    run_with_head,
    wide_float,
)
from supermerge.learn.objectives import logits_of
from supermerge.learn.stream import named_blocks

log = logging.getLogger(__name__)


def block_modules(module: nn.Module) -> list[nn.Module]:
    """Return the module's numbered transformer blocks, in order of definition."""
    return [m for _, m in named_blocks(module)]


@contextmanager
def captured_blocks(module: nn.Module, enabled: bool = True) -> Iterator[list[torch.Tensor]]:
    """Yield a list that the module's forward passes fill with each block's output state
    (the first tensor of a tuple output), in execution order; nothing when not ``enabled``."""
    states: list[torch.Tensor] = []
    if not enabled:
        yield states
        return

    def keep(_module: nn.Module, _inputs: object, output: object) -> None:
        states.append(output[0] if isinstance(output, tuple) else output)

    hooks = [block.register_forward_hook(keep) for block in block_modules(module)]
    try:
        yield states
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def attach_teachers(
    module: nn.Module,
    experts: Mapping[str, Mapping[str, torch.Tensor]],
    names: Sequence[str],
    heads: Mapping[str, Head],
    tasks: Sequence[Task],
    *,
    hidden: bool = True,
    batch_size: int = 16,
) -> list[Task]:
    """Return ``tasks`` with each example's expert outputs in ``data.teacher``.

    Task t's teacher is the expert named t, run with t's head: its logits and (with
    ``hidden``) its blocks' states, kept in float32 on the CPU (for a language model the
    logits of every position: examples x tokens x vocabulary floats). Raises LearnError
    if a task has no expert of its name; a module with no numbered blocks gets no states
    (logged), so the objective matches the predictions only. Costs one forward pass of
    each expert over its task's examples and one expert weight set resident at a time; the
    states take examples x tokens x width x blocks floats per task.
    """
    check_task_experts(
        experts, tasks, "distillation learns each task from the expert of the same name",
        fix="name each task like the expert fine-tuned on it, or use objective: labels")
    if hidden and not block_modules(module):
        log.warning("%s has no numbered blocks (layers.N, layer.N, h.N, blocks.N, block.N): "
                    "distillation matches the experts' predictions only", type(module).__name__)
        hidden = False
    with eval_mode(module):
        return [_taught(module, experts[task.name], names, heads.get(task.name), task, hidden,
                        batch_size) for task in tasks]


def _taught(module: nn.Module, expert: Mapping[str, torch.Tensor], names: Sequence[str],
            head: Head | None, task: Task, hidden: bool, batch_size: int) -> Task:
    """Return ``task`` with its expert's outputs attached (see :func:`attach_teachers`)."""
    weights = {name: expert[name] for name in names}
    outputs: list[list[torch.Tensor]] = []
    for start in range(0, len(task.data), batch_size):
        batch = task.data.select(torch.arange(start, min(start + batch_size, len(task.data))))
        args, kwargs = batch.call_args()
        with captured_blocks(module, hidden) as states:
            output = run_with_head(module, weights, head, args, kwargs)
        outputs.append([wide_float(logits_of(output)), *(wide_float(s) for s in states)])
    teacher = tuple(torch.cat(parts) for parts in zip(*outputs, strict=True))
    log.info("cached the outputs of expert %r on %d examples", task.name, len(task.data))
    return replace(task, data=replace(task.data, teacher=teacher))
