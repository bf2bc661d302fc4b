"""The training loop: learn W of a :class:`MergedModel` on the tasks' validation data.

Adam on W alone; every step draws a batch from each task's training split (batches mix all
tasks) and minimises the sum of the tasks' losses under one shared merge, back-propagated
task by task to the merged tensors and then once through the merge. A held-out part
of each task's examples (default 25 %) is scored every ``eval_every`` steps and the W with
the lowest held-out loss is kept: about 2,000 coefficients learned from about 350 examples
overfit otherwise. Randomness (split, batches) comes from one seeded ``torch.Generator``.
The module runs in eval mode (no dropout) while W is learned.

Data parallelism (``parallel``, see :mod:`supermerge.learn.distributed`): every process
draws the same split and batches, runs only its shard of each batch, weights that shard's
loss by its share of the batch and sums the gradients of W (and the losses) over the
processes, so that all processes take the same steps as one process would.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from supermerge.learn.data import IGNORE_INDEX, Task, TaskData
from supermerge.learn.distill import captured_blocks
from supermerge.learn.errors import LearnError
from supermerge.learn.model import MergedModel, eval_mode
from supermerge.learn.objectives import LabelLoss, Objective, as_objective, logits_of
from supermerge.progress import Progress

log = logging.getLogger(__name__)



class DataParallel(Protocol):
    """How a learned merge is spread over processes (``learn_coefficients(parallel=...)``)."""

    def shard(self, batch: TaskData) -> tuple[TaskData, float]:
        """Return this process's part of ``batch`` and its share (part size / batch size)."""
        ...

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over all processes, in place (every process calls it alike)."""
        ...


@dataclass(frozen=True)
class Evaluation:
    """Losses (summed over tasks) on the training and held-out splits at one step, and the
    held-out accuracy over the classification tasks' labelled examples (None without)."""

    step: int
    train_loss: float
    heldout_loss: float | None
    heldout_accuracy: float | None = None


@dataclass(frozen=True)
class LearnResult:
    """What one learned merge found; the model itself holds the best W afterwards.

    ``raw`` is the best W, ``coefficients`` map(W) (K experts x J groups); the losses are
    those at ``best_step``, chosen by the held-out loss of ``objective``; ``history`` has
    every evaluation.
    """

    expert_names: list[str]
    group_names: list[str]
    coefficient_map: str
    raw: torch.Tensor
    coefficients: torch.Tensor
    best_step: int
    train_loss: float
    heldout_loss: float | None
    history: list[Evaluation]
    objective: str = "labels"
    heldout_accuracy: float | None = None

    @property
    def steps_run(self) -> int:
        """Optimisation steps taken: fewer than planned after an early stop (``patience``)."""
        return max((evaluation.step for evaluation in self.history), default=self.best_step)


def learn_coefficients(
    model: MergedModel,
    tasks: Sequence[Task],
    *,
    objective: str | Objective | LabelLoss = "labels",
    steps: int = 200,
    lr: float = 1e-2,
    batch_size: int = 16,
    holdout: float = 0.25,
    eval_every: int = 10,
    seed: int = 0,
    progress: Progress | None = None,
    parallel: DataParallel | None = None,
    stream_gradients: bool = False,
    reg: float = 0.0,
    patience: int = 0,
) -> LearnResult:
    """Learn ``model``'s W on ``tasks``; returns the result and loads the best W into the model.

    Each step costs one merge (a read of all task vectors), one forward and backward pass per
    task on ``batch_size`` examples, and a backward through the merge (a second read; one
    per task with ``stream_gradients``, which holds no gradient set in exchange). Each
    evaluation adds forward passes over all examples. With ``parallel`` each process runs
    its shard of every batch and W's gradient and the losses are summed over the processes
    (two all-reduces per step, two per evaluation). ``reg`` adds ``reg * ||map(W) -
    map(W_0)||^2``, a pull toward the start. ``patience`` > 0 stops after that many
    evaluations in a row without a better held-out loss (early stopping). Raises
    LearnError before training if a task has no head, no examples, labels its head cannot
    produce, or lacks the experts' outputs a distilling objective needs; and during
    training if a loss is not finite.
    """
    objective_fn = as_objective(objective)
    check_tasks(model, tasks, needs_labels=objective_fn.needs_labels,
                needs_teacher=objective_fn.needs_teacher)
    splits, batches = draw_examples(tasks, holdout, batch_size, seed)
    with eval_mode(model):
        return _fit(model, tasks, splits, batches, objective_fn, steps=steps, lr=lr,
                    eval_every=eval_every, progress=progress, parallel=parallel,
                    stream_gradients=stream_gradients, reg=reg, patience=patience)


def _fit(model: MergedModel, tasks: Sequence[Task],
         splits: Sequence[tuple[TaskData, TaskData | None]],
         batches: Sequence[Iterator[torch.Tensor]], objective_fn: Objective, *, steps: int,
         lr: float, eval_every: int, progress: Progress | None,
         parallel: DataParallel | None, stream_gradients: bool, reg: float, patience: int,
         ) -> LearnResult:
    optimizer = torch.optim.Adam([model.weight], lr=lr)
    history = [evaluate(model, tasks, splits, objective_fn, 0, parallel)]
    best, best_raw = history[0], model.weight.detach().clone()
    start = model.coefficients().detach().clone()
    stale = 0  # evaluations since the best one
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        chosen = [train.select(next(b)) for (train, _), b in zip(splits, batches, strict=True)]
        loss = _backward(model, tasks, chosen, objective_fn, parallel, stream_gradients)
        if reg:
            (reg * (model.coefficients() - start).square().sum()).backward()
        optimizer.step()
        if progress is not None:
            progress("learn", step, steps, loss)
        if step % eval_every == 0 or step == steps:
            history.append(evaluate(model, tasks, splits, objective_fn, step, parallel))
            if _score(history[-1]) < _score(best):
                best, best_raw, stale = history[-1], model.weight.detach().clone(), 0
            else:
                stale += 1
            if patience and stale >= patience:
                log.info("stopped early at step %d: no better held-out loss since step %d",
                         step, best.step)
                if progress is not None:
                    progress("learn", steps, steps, loss)  # this fit is done
                break
    model.set_weight(best_raw)
    log.info(
        "learned %s coefficients (%s): best step %d, train loss %.4f, held-out loss %s, "
        "held-out accuracy %s", "x".join(map(str, best_raw.shape)), objective_fn.name,
        best.step, best.train_loss, best.heldout_loss, best.heldout_accuracy,
    )
    return LearnResult(
        expert_names=list(model.expert_names),
        group_names=list(model.group_names),
        coefficient_map=model.coefficient_map,
        raw=best_raw,
        coefficients=model.coefficients().detach().clone(),
        best_step=best.step,
        train_loss=best.train_loss,
        heldout_loss=best.heldout_loss,
        history=history,
        objective=objective_fn.name,
        heldout_accuracy=best.heldout_accuracy,
    )


@torch.no_grad()
def check_tasks(model: MergedModel, tasks: Sequence[Task], *, needs_labels: bool = True,
                needs_teacher: bool = False) -> None:
    """Raise LearnError unless every task has a head, examples, labels its head can produce
    and, with ``needs_teacher``, its expert's outputs.

    Costs one merge and one forward pass on one example per task.
    """
    if not tasks:
        raise LearnError("no tasks to learn from", fix="give each task its validation data")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise LearnError(f"task names repeat: {names}", fix="name each task once")
    weights = model.run_weights()
    for task in tasks:
        source = task.data.source
        if model.tasks and task.name not in model.tasks:
            raise LearnError(
                f"task {task.name!r} has no head",
                file=source,
                fix="give an expert of the same name with its head tensors (head_prefix), "
                f"or pass heads; tasks with a head: {', '.join(model.tasks)}",
            )
        if len(task.data) == 0:
            raise LearnError(f"task {task.name!r} has no examples", file=source)
        if needs_teacher and task.data.teacher is None:
            raise LearnError(f"task {task.name!r} lacks its expert's outputs", file=source,
                             fix="distilling objectives need attach_teachers() first")
        labels = task.data.labels
        if labels is None:
            if needs_labels:
                raise LearnError(f"task {task.name!r} has no labels", file=source,
                                 fix="the supervised objective needs labelled examples")
            continue
        if labels.is_floating_point():
            raise LearnError(f"labels of task {task.name!r} are not integers", file=source)
        args, kwargs = task.data.select(torch.arange(1)).call_args()
        classes = logits_of(model(*args, task=task.name, weights=weights, **kwargs)).shape[-1]
        valid = (labels >= 0) & (labels < classes) | (labels == IGNORE_INDEX)
        if not bool(valid.all()):
            bad = sorted(set(labels[~valid].tolist()))[:5]
            raise LearnError(
                f"task {task.name!r} has labels {bad} outside its head's {classes} classes",
                file=source,
                fix=f"labels must lie in 0..{classes - 1}; check the labels or the head",
            )


def prediction_loss(model: MergedModel, tasks: Sequence[Task], objective: Objective, *,
                    holdout: float, seed: int) -> float:
    """Return ``objective``'s prediction terms (its block-state term dropped) summed over the
    tasks on the held-out part that :func:`learn_coefficients` with ``holdout`` and ``seed``
    holds out (the training part where nothing is held out), under the model's current W.

    Comparable across fits of different coefficients, bases or schedules on the same
    tasks. Costs one merge and a forward pass over the held-out examples.
    """
    splits, _ = draw_examples(tasks, holdout, 1, seed)
    parts = [held if held is not None else train for train, held in splits]
    predictions = replace(as_objective(objective), feature_weight=0.0)
    with eval_mode(model), torch.no_grad():
        return _loss(model, tasks, parts, predictions, model.run_weights())[0]


def prediction_losses(model: MergedModel, tasks: Sequence[Task], objective: Objective, *,
                      holdout: float, seed: int) -> list[torch.Tensor]:
    """Return, per task, the prediction loss of each example of the part that
    :func:`prediction_loss` scores (one forward pass per example): the paired evidence
    with which two fits on the same tasks are compared (:func:`paired_bootstrap`)."""
    splits, _ = draw_examples(tasks, holdout, 1, seed)
    parts = [held if held is not None else train for train, held in splits]
    predictions = replace(as_objective(objective), feature_weight=0.0)
    with eval_mode(model), torch.no_grad():
        weights = model.run_weights()
        return [torch.tensor([_task_loss(model, task, part.select(torch.tensor([i])),
                                         predictions, weights)[0].item()
                              for i in range(len(part))], dtype=torch.float64)
                for task, part in zip(tasks, parts, strict=True)]


def paired_bootstrap(challenger: Sequence[torch.Tensor], incumbent: Sequence[torch.Tensor],
                     *, resamples: int = 2000, seed: int = 0) -> float:
    """Return the share of bootstrap resamples (examples drawn with replacement within each
    task, the same draw for both) in which ``challenger``'s summed mean loss is below
    ``incumbent``'s: how sure the held-out examples are that the challenger is better.
    Costs ``resamples`` x examples additions."""
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(resamples, dtype=torch.float64)
    for ours, theirs in zip(challenger, incumbent, strict=True):
        difference = ours - theirs
        draws = torch.randint(len(difference), (resamples, len(difference)),
                              generator=generator)
        total += difference[draws].mean(dim=1)
    return float((total < 0).double().mean())


def draw_examples(tasks: Sequence[Task], holdout: float, batch_size: int, seed: int
                  ) -> tuple[list[tuple[TaskData, TaskData | None]], list[Iterator[torch.Tensor]]]:
    """Return each task's (training part, held-out part or None) and its endless training
    batches, all drawn from one generator seeded with ``seed``: the same seed gives the
    same split to every fit and to :func:`prediction_loss`."""
    generator = torch.Generator().manual_seed(seed)
    splits = [split_heldout(task.data, holdout, generator) for task in tasks]
    return splits, [endless_batches(len(train), batch_size, generator) for train, _ in splits]


def split_heldout(
    data: TaskData, holdout: float, generator: torch.Generator
) -> tuple[TaskData, TaskData | None]:
    """Return (training part, held-out part or None) of ``data``: a ``holdout`` share of
    its examples, drawn with ``generator``, is held out unless that leaves a part empty."""
    order = torch.randperm(len(data), generator=generator)
    held = int(len(data) * holdout)
    if held == 0 or held == len(data):
        return data.select(order), None
    return data.select(order[held:]), data.select(order[:held])


def endless_batches(n: int, batch_size: int, generator: torch.Generator
                    ) -> Iterator[torch.Tensor]:
    """Endless batches of indices below ``n``: a fresh permutation each epoch."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]


def _part(batch: TaskData, parallel: DataParallel | None) -> tuple[TaskData, float]:
    """This process's part of ``batch`` and its share of it (all of it without ``parallel``)."""
    return (batch, 1.0) if parallel is None else parallel.shard(batch)


def _backward(model: MergedModel, tasks: Sequence[Task], batches: Sequence[TaskData],
              objective: Objective | LabelLoss, parallel: DataParallel | None = None,
              streamed: bool = False) -> float:
    """Put d(sum of the tasks' losses)/dW into ``model.weight.grad``; returns the sum.

    Each task's loss is back-propagated to the merged tensors (its activations are freed
    before the next task runs); their gradients are reduced to K x J numbers after the
    last task, or as each is computed with ``streamed`` (:meth:`MergedModel.merged_leaves`).
    Peak: one task's activations, one merged weight set and, unless ``streamed``, one
    gradient set. With ``parallel`` the gradient and the sum are those of all processes
    together.
    """
    objective = as_objective(objective)
    leaves = model.merged_leaves(streamed=streamed)
    total = torch.zeros((), dtype=torch.float64)
    for task, batch in zip(tasks, batches, strict=True):
        part, share = _part(batch, parallel)
        if len(part) == 0:
            continue
        loss = share * _task_loss(model, task, part, objective, leaves.weights)[0]
        loss.backward()
        total += loss.item()
    leaves.backward()
    if parallel is not None:
        parallel.all_reduce(model.weight.grad)
        parallel.all_reduce(total)
    return total.item()


def _task_loss(model: MergedModel, task: Task, batch: TaskData, objective: Objective,
               weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (the objective on ``batch`` under merged ``weights``, the logits).

    Captures the blocks' states when the objective matches them. Raises LearnError if the
    loss is not finite.
    """
    args, kwargs = batch.call_args()
    with captured_blocks(model.module, objective.needs_hidden) as states:
        output = model(*args, task=task.name, weights=weights, **kwargs)
    loss = objective(output, batch, task.kind, states)
    if not torch.isfinite(loss):
        raise LearnError(
            f"the {objective.name} loss of task {task.name!r} is {loss.item()}: training "
            "stopped, nothing is exported",
            file=batch.source,
            fix="check the expert's weights for huge or non-finite values; for a language "
            "model, an example whose prompt fills max_length leaves no token to score "
            "(raise max_length or shorten the prompt)",
        )
    return loss, logits_of(output)


def _loss(model: MergedModel, tasks: Sequence[Task], data: Sequence[TaskData | None],
          objective: Objective, weights: dict[str, torch.Tensor],
          parallel: DataParallel | None = None) -> tuple[float, float | None]:
    """Return (sum of the tasks' losses, accuracy over the classification tasks' labelled
    examples or None) under merged ``weights``; tasks without data are skipped.

    For evaluation: with gradients it would keep every task's activations at once. With
    ``parallel``, each process scores its shard and the sums are over all processes.
    """
    total = torch.zeros(3, dtype=torch.float64)  # loss, correct, counted
    for task, batch in zip(tasks, data, strict=True):
        if batch is None:
            continue
        part, share = _part(batch, parallel)
        if len(part) > 0:
            loss, logits = _task_loss(model, task, part, objective, weights)
            total[0] += share * loss.item()
            if task.kind == "classification" and part.labels is not None:
                labelled = part.labels != IGNORE_INDEX
                total[1] += (logits.argmax(-1) == part.labels)[labelled].sum().item()
                total[2] += labelled.sum().item()
    if parallel is not None:
        parallel.all_reduce(total)
    loss, correct, counted = total.tolist()
    return loss, (correct / counted if counted else None)


@torch.no_grad()
def evaluate(model: MergedModel, tasks: Sequence[Task],
              splits: Sequence[tuple[TaskData, TaskData | None]], objective: Objective,
              step: int, parallel: DataParallel | None = None) -> Evaluation:
    """Return the objective's losses on the training and held-out parts at ``step`` (and
    the held-out accuracy). Costs one merge and a forward pass over every example."""
    weights = model.run_weights()
    train, _ = _loss(model, tasks, [t for t, _ in splits], objective, weights, parallel)
    heldout = accuracy = None
    if any(h is not None for _, h in splits):
        heldout, accuracy = _loss(model, tasks, [h for _, h in splits], objective, weights,
                                  parallel)
    return Evaluation(step, train, heldout, accuracy)


def _score(evaluation: Evaluation) -> float:
    return evaluation.train_loss if evaluation.heldout_loss is None else evaluation.heldout_loss
