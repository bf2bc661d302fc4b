"""Layer-wise fitting of merge coefficients: one transformer block at a time (ProDistill).

ProDistill (arXiv 2502.12706) fits the coefficients of block ``b`` so that the merged
block, fed what the merged model computes up to it, reproduces what each task's expert
computes after block ``b`` on the task's inputs: a sum over tasks of the relative squared
distance of the block states (padding masked, :func:`~supermerge.learn.objectives.
feature_distance`). The blocks are fitted in order; each later block sees the inputs the
already fitted blocks produce, so errors do not compound unseen. Every step runs one block
on cached inputs instead of the whole model, and each block's target is dense (every
token's state), which is why finer coefficients (``granularity: row``) can be fitted from
a few examples here where an end-to-end loss overfits them.

Tensors outside the numbered blocks (embeddings, final norms, pooler) keep their starting
coefficients, as in ProDistill. The paper fits one coefficient per weight entry; here the
model's ``granularity`` decides (``tensor``, ``row`` or ``block``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from supermerge.learn.data import Task, TaskData
from supermerge.learn.distill import named_blocks
from supermerge.learn.errors import LearnError
from supermerge.learn.model import MergedModel, eval_mode
from supermerge.learn.objectives import Objective, as_objective, feature_distance, token_mask
from supermerge.learn.stream import uncached
from supermerge.learn.train import (
    DataParallel,
    LearnResult,
    check_tasks,
    draw_examples,
    evaluate,
)
from supermerge.progress import Progress

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Captured:
    """A block's positional and keyword arguments as the model called it on a set of
    examples; ``per_example`` has the same structure, True at each tensor that holds one
    row per example (found by comparing with a call on fewer examples)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    per_example: tuple[Any, Any]

    def select(self, index: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Return (args, kwargs) for the examples at ``index``."""
        return (_rows(self.args, self.per_example[0], index),
                _rows(self.kwargs, self.per_example[1], index))


class _Stop(Exception):
    """Raised by the capturing hook: the rest of the forward pass is not needed."""


@torch.no_grad()
def block_inputs(model: MergedModel, task: Task, data: TaskData, block: nn.Module,
                 weights: dict[str, torch.Tensor]) -> Captured:
    """Return the arguments ``block`` receives when the model, on merged ``weights``, runs
    ``task`` on all of ``data`` at once. Costs the forward pass up to that block, twice
    (the second on one example, to tell per-example tensors from shared ones)."""
    args, kwargs = _call_block(model, task, data, block, weights)
    one_args, one_kwargs = (args, kwargs) if len(data) == 1 else _call_block(
        model, task, data.select(torch.arange(1)), block, weights)
    n = len(data)
    return Captured(args, kwargs,
                    (_per_example(args, one_args, n), _per_example(kwargs, one_kwargs, n)))


def _call_block(model: MergedModel, task: Task, data: TaskData, block: nn.Module,
                weights: dict[str, torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def grab(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((args, kwargs))
        raise _Stop

    hook = block.register_forward_pre_hook(grab, with_kwargs=True)
    args, kwargs = data.call_args()
    try:
        model(*args, task=task.name, weights=weights, **kwargs)
    except _Stop:
        pass
    finally:
        hook.remove()
    if not captured:
        raise LearnError(f"block {type(block).__name__} was not run for task {task.name!r}",
                         fix="layerwise fitting needs a model that runs all its blocks")
    args, kwargs = captured[0]
    # a replayed block must not append to the key/value cache of the captured call
    return args, {k: uncached(k, v) for k, v in kwargs.items()}


def _per_example(full: Any, one: Any, n: int) -> Any:
    """``full``'s structure with True at each tensor that holds one row per example: its
    first dimension is the ``n`` examples and the same tensor in ``one`` (the call on one
    example) does not keep that size; False elsewhere."""
    if isinstance(full, torch.Tensor):
        kept = isinstance(one, torch.Tensor) and one.dim() and one.shape[0] == n
        return bool(full.dim() and full.shape[0] == n and not kept)
    if isinstance(full, tuple | list):
        ones = one if isinstance(one, tuple | list) else [None] * len(full)
        return type(full)(_per_example(f, o, n) for f, o in zip(full, ones, strict=False))
    if isinstance(full, dict):
        return {k: _per_example(v, one.get(k) if isinstance(one, dict) else None, n)
                for k, v in full.items()}
    return False


def _rows(value: Any, per_example: Any, index: torch.Tensor) -> Any:
    """``value`` with every per-example tensor narrowed to ``index`` (recursively)."""
    if isinstance(value, torch.Tensor):
        return value[index] if per_example else value
    if isinstance(value, tuple | list):
        return type(value)(_rows(v, p, index) for v, p in zip(value, per_example, strict=True))
    if isinstance(value, dict):
        return {k: _rows(v, per_example[k], index) for k, v in value.items()}
    return value


def _state(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class _BlockFit:
    """One block's loss: the merged block on captured inputs against the experts' states."""

    def __init__(self, model: MergedModel, prefix: str, block: nn.Module, position: int) -> None:
        self.model, self.block, self.position = model, block, position
        self.names = [n for n in model.names if n.startswith(prefix + ".")]
        self.local = {n: n[len(prefix) + 1:] for n in self.names}
        self.columns = model.groups_of(self.names)

    def loss(self, inputs: Sequence[Captured], data: Sequence[TaskData],
             index: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Return the summed distance over tasks for the examples at ``index`` (None: all),
        differentiable w.r.t. W."""
        merged = self.model.merged_parameters(self.names)
        weights = {self.local[n]: t for n, t in merged.items()}
        total = torch.zeros((), dtype=torch.float32)
        for captured, examples, chosen in zip(inputs, data, index, strict=True):
            args, kwargs = captured.args, captured.kwargs
            if chosen is not None:
                args, kwargs = captured.select(chosen)
                examples = examples.select(chosen)
            output = _state(functional_call(self.block, weights, args, kwargs))
            target = examples.teacher[1 + self.position]
            total = total + feature_distance([output], [target], token_mask(examples))
        return total


def learn_layerwise(
    model: MergedModel,
    tasks: Sequence[Task],
    *,
    objective: str | Objective = "distill",
    steps: int = 40,
    lr: float = 5e-2,
    batch_size: int = 8,
    holdout: float = 0.25,
    eval_every: int = 10,
    seed: int = 0,
    progress: Progress | None = None,
    parallel: DataParallel | None = None,
    stream_gradients: bool = False,
    reg: float = 0.0,
    patience: int = 0,
) -> LearnResult:
    """Learn ``model``'s W block by block; returns the result and leaves the fitted W in the
    model.

    For each numbered block in order: ``steps`` Adam steps on that block's coefficients
    (each step runs the block alone on a batch of each task's cached inputs), keeping the
    step with the lowest held-out distance (every ``eval_every`` steps; ``patience`` stops
    a block early), then the next block's inputs are recomputed under the fitted blocks.
    The result's losses are ``objective`` end to end before and after, for comparison with
    :func:`~supermerge.learn.train.learn_coefficients`. Costs per block ``steps`` forward
    and backward passes of one block and one forward pass of the model up to the next
    block per task; memory: one block's activations for a batch of every task, plus each
    task's inputs to the current block (examples x tokens x width floats). Raises
    LearnError if the tasks lack their experts' block states, the module has no numbered
    blocks, a merge group spans blocks, ``parallel`` is given, or the model streams its task
    vectors (``memory="stream"``).
    """
    objective_fn = as_objective(objective)
    if parallel is not None:
        raise LearnError("layerwise fitting runs in one process",
                         fix="drop layerwise or run without torch.distributed")
    if model.memory == "stream":
        raise LearnError("layerwise fitting holds the task vectors in memory",
                         fix="build the model with memory in_memory, or fit end to end")
    check_tasks(model, tasks, needs_labels=objective_fn.needs_labels, needs_teacher=True)
    blocks = named_blocks(model.module)
    fits = [_BlockFit(model, prefix, block, position)
            for position, (prefix, block) in enumerate(blocks)]
    _check_layout(model, tasks, fits)
    splits, batches = draw_examples(tasks, holdout, batch_size, seed)
    with eval_mode(model):
        return _fit_blocks(model, tasks, fits, splits, batches, objective_fn, steps=steps,
                           lr=lr, eval_every=eval_every, progress=progress, reg=reg,
                           patience=patience)


def _fit_blocks(model: MergedModel, tasks: Sequence[Task], fits: Sequence[_BlockFit],
                splits: Sequence[tuple[TaskData, TaskData | None]],
                batches: Sequence[Iterator[torch.Tensor]], objective_fn: Objective, *,
                steps: int, lr: float, eval_every: int, progress: Progress | None, reg: float,
                patience: int) -> LearnResult:
    first = evaluate(model, tasks, splits, objective_fn, 0)
    start = model.coefficients().detach().clone()
    total_steps, done, last_loss = steps * len(fits), 0, 0.0
    for fit in fits:
        with torch.no_grad():
            weights = model.merged_parameters()
        train_inputs = [block_inputs(model, t, train, fit.block, weights)
                        for t, (train, _) in zip(tasks, splits, strict=True)]
        held_inputs = [None if held is None else block_inputs(model, t, held, fit.block, weights)
                       for t, (_, held) in zip(tasks, splits, strict=True)]
        del weights
        best_loss, last_loss = _fit_block(
            model, fit, splits, train_inputs, held_inputs, batches, start,
            steps=steps, lr=lr, reg=reg, eval_every=eval_every, patience=patience,
            progress=None if progress is None else
            (lambda step, loss, offset=done: progress("learn", offset + step, total_steps,
                                                      loss)))
        done += steps
        log.info("fitted block %d of %d (%d coefficients): held-out distance %.4f",
                 fit.position + 1, len(fits), len(fit.columns) * model.weight.shape[0],
                 best_loss)
    final = evaluate(model, tasks, splits, objective_fn, total_steps)
    log.info("learned %s coefficients block by block (%s): train loss %.4f -> %.4f, held-out "
             "loss %s -> %s, held-out accuracy %s", "x".join(map(str, model.weight.shape)),
             objective_fn.name, first.train_loss, final.train_loss, first.heldout_loss,
             final.heldout_loss, final.heldout_accuracy)
    return LearnResult(
        expert_names=list(model.expert_names),
        group_names=list(model.group_names),
        coefficient_map=model.coefficient_map,
        raw=model.weight.detach().clone(),
        coefficients=model.coefficients().detach().clone(),
        best_step=total_steps,
        train_loss=final.train_loss,
        heldout_loss=final.heldout_loss,
        history=[first, final],
        objective=objective_fn.name,
        heldout_accuracy=final.heldout_accuracy,
    )


def _check_layout(model: MergedModel, tasks: Sequence[Task], fits: Sequence[_BlockFit]) -> None:
    if not fits:
        raise LearnError(f"{type(model.module).__name__} has no numbered blocks (layers.N, "
                         "layer.N, h.N, blocks.N, block.N) to fit one at a time",
                         fix="drop layerwise")
    for task in tasks:
        held = 0 if task.data.teacher is None else len(task.data.teacher) - 1
        if held < len(fits):
            raise LearnError(f"task {task.name!r} lacks its expert's block states",
                             file=task.data.source,
                             fix="layerwise fitting needs a distilling objective with "
                             "feature_weight > 0")
    owner: dict[int, int] = {}
    outside = set(model.groups_of([n for n in model.names
                                   if not any(n in fit.local for fit in fits)]))
    for fit in fits:
        for column in fit.columns:
            if owner.setdefault(column, fit.position) != fit.position or column in outside:
                raise LearnError(
                    f"merge group {model.group_names[column]!r} spans more than one block",
                    fix="use granularity tensor, row or block with layerwise")


def _fit_block(
    model: MergedModel, fit: _BlockFit, splits: Sequence[tuple[TaskData, TaskData | None]],
    train_inputs: Sequence[Captured], held_inputs: Sequence[Captured | None],
    batches: Sequence[Iterator[torch.Tensor]], start: torch.Tensor, *, steps: int,
    lr: float, reg: float, eval_every: int, patience: int, progress: Any,
) -> tuple[float, float]:
    """Fit one block's columns of W; returns (best held-out distance, or training distance
    without a held-out part; the last step's training loss)."""
    columns = torch.tensor(fit.columns)
    optimizer = torch.optim.Adam([model.weight], lr=lr)
    trains = [train for train, _ in splits]
    held = [(inputs, data) for inputs, (_, data) in zip(held_inputs, splits, strict=True)
            if data is not None and inputs is not None]

    def score() -> float:
        with torch.no_grad():
            if held:
                inputs, data = zip(*held, strict=True)
                return fit.loss(inputs, data, [None] * len(data)).item()
            return fit.loss(train_inputs, trains, [None] * len(trains)).item()

    best, best_columns, stale, loss = score(), model.weight[:, columns].detach().clone(), 0, 0.0
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        chosen = [next(b) for b in batches]
        objective = fit.loss(train_inputs, trains, chosen)
        if reg:
            pulled = model.coefficients()[:, columns] - start[:, columns]
            objective = objective + reg * pulled.square().sum()
        objective.backward()
        optimizer.step()
        loss = objective.item()
        if progress is not None:
            progress(step, loss)
        if step % eval_every == 0 or step == steps:
            current = score()
            if current < best:
                best, best_columns, stale = current, model.weight[:, columns].detach().clone(), 0
            else:
                stale += 1
            if patience and stale >= patience:
                break
    with torch.no_grad():
        model.weight[:, columns] = best_columns
    return best, loss

