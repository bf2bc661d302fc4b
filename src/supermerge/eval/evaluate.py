"""``evaluate(model, tasks)``: each task's metric with its own head, the average, and the
score normalised by the task's expert (merged / expert, on the same test split).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any

from torch import nn

from supermerge.engine import TaskState, load_task_state, read_task_state
from supermerge.engine.task_state import TASK_STATE_JSON
from supermerge.eval.experts import Expert, ExpertConfig
from supermerge.eval.model import (
    MeanPooledEncoder,
    head_path,
    load_encoder,
    load_head,
    load_tokenizer,
    predict,
    tokenize,
)
from supermerge.eval.tasks import Split, Task, TaskError
from supermerge.learn.modules import PooledClassifier
from supermerge.learn.surgery import SURGERY_JSON, read_surgery
from supermerge.learn.twin import TWIN_JSON, load_twin
from supermerge.progress import Progress, ignore


@dataclass(frozen=True)
class TaskScore:
    """One task's metric for one model, and its expert's on the same split (if known)."""

    task: str
    metric: str
    score: float
    expert: float | None = None

    @property
    def normalized(self) -> float | None:
        """score / expert score; None without an expert (or one scoring 0)."""
        return self.score / self.expert if self.expert else None


@dataclass(frozen=True)
class EvalReport:
    """Scores of one model on several tasks."""

    model: str
    split: str
    scores: dict[str, TaskScore]
    seconds: float

    @property
    def average(self) -> float:
        """Mean of the per-task scores."""
        return sum(s.score for s in self.scores.values()) / len(self.scores)

    @property
    def normalized(self) -> float | None:
        """Mean over tasks of merged / expert; None if any task lacks an expert score."""
        values = [s.normalized for s in self.scores.values()]
        if any(v is None for v in values):
            return None
        return sum(values) / len(values)

    def per_task(self) -> dict[str, float]:
        """Task name -> score."""
        return {name: s.score for name, s in self.scores.items()}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary: model, split, per task, average, normalised, seconds."""
        return {
            "model": self.model,
            "split": self.split,
            "metrics": {name: s.metric for name, s in self.scores.items()},
            "per_task": self.per_task(),
            "experts": {name: s.expert for name, s in self.scores.items()},
            "average": self.average,
            "normalized": self.normalized,
            "seconds": self.seconds,
        }


def evaluate(
    model: str | Path | nn.Module,
    tasks: Sequence[Task],
    *,
    experts: Mapping[str, Expert] | None = None,
    heads: Mapping[str, nn.Module] | None = None,
    tokenizer: Any = None,
    split: Split = "test",
    max_length: int = ExpertConfig.max_length,
    batch_size: int = 64,
    label: str | None = None,
    progress: Progress = ignore,
) -> EvalReport:
    """Score ``model`` (an encoder directory or module) on each task's ``split``.

    Each task is answered with its own head: ``heads[task]`` if given, else the model
    directory's ``heads/<task>.safetensors`` (a learned merge's export), else the task's
    expert's head. A merge that needs task ids (``task_state.json``: TALL masks, EMR)
    answers each task with that task's own model, its id found from the task's expert or
    name; a Twin-Merging output (``twin.json``) routes each input through its router, and
    Representation Surgery modules (``surgery.json``) act in front of each task's head.
    Normalisation uses the experts' test scores (``split`` "test" only).
    The tokenizer defaults to the model directory's, else the first expert's. Costs one
    forward pass per ``batch_size`` examples (plus, for a per-task merge, one read of the
    model per task). Raises TaskError for a task without a head or with a head of the
    wrong size.
    """
    started = time.perf_counter()
    experts = experts or {}
    directory = None if isinstance(model, nn.Module) else Path(model)
    if directory is not None:
        encoder = load_encoder(directory)
    else:
        encoder = model if isinstance(model, MeanPooledEncoder) else MeanPooledEncoder(model)
        encoder.eval()
    if tokenizer is None:
        candidates = [p for p in [directory, *(e.path for e in experts.values())] if p]
        tokenizer = load_tokenizer(*candidates)
    label = label or (str(directory) if directory else type(model).__name__)
    data = {task.name: task.examples(split) for task in tasks}
    total = sum(math.ceil(len(texts) / batch_size) for texts, _ in data.values())
    stage = f"evaluate {label}"
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        progress(stage, done, total)

    state = _task_state(directory)
    routed = directory is not None and (directory / TWIN_JSON).is_file()
    surgery = read_surgery(directory) if directory is not None and (
        directory / SURGERY_JSON).is_file() else None
    scores = {}
    for task in tasks:
        if state is not None:  # a per-task merge: this task's own model, by its task id
            encoder.load_weights(load_task_state(directory, _task_index(state, task, experts)))
        head = _head_for(task, directory, experts, heads or {})
        if surgery is not None:  # Representation Surgery in front of the task's head
            head = nn.Sequential(surgery.modules[task.name], head)
        texts, labels = data[task.name]
        ids = tokenize(tokenizer, texts, max_length)
        if routed:  # Twin-Merging: each input on its own mixture, with the task's head
            model_of_task = load_twin(PooledClassifier(encoder, head, None), directory,
                                      head=head, prefix="encoder.")
            predictions = predict(model_of_task, attrgetter("logits"), ids,
                                  tokenizer.pad_token_id, batch_size, tick)
        else:
            predictions = predict(encoder, head, ids, tokenizer.pad_token_id, batch_size, tick)
        expert = experts.get(task.name)
        scores[task.name] = TaskScore(
            task.name, str(task.metric), task.score(predictions, labels),
            expert.score if expert is not None and split == "test" else None)
    return EvalReport(label, split, scores, time.perf_counter() - started)


def _task_state(directory: Path | None) -> TaskState | None:
    """The per-task state of a merge that needs task ids (TALL masks, EMR), else None."""
    if directory is None or not (directory / TASK_STATE_JSON).is_file():
        return None
    return read_task_state(directory)


def _task_index(state: TaskState, task: Task, experts: Mapping[str, Expert]) -> int:
    """The task id of ``task`` in a per-task merge: the index of its expert among the
    merged models, else the task state's own lookup by name (CheckpointError if none)."""
    expert = experts.get(task.name)
    if expert is not None:
        for index, name in enumerate(state.tasks):
            if Path(name).resolve() == expert.path.resolve():
                return index
    return state.index(task.name)


def _head_for(task: Task, directory: Path | None, experts: Mapping[str, Expert],
              heads: Mapping[str, nn.Module]) -> nn.Module:
    if task.name in heads:
        head = heads[task.name]
    elif directory is not None and head_path(directory, task.name).is_file():
        head = load_head(head_path(directory, task.name))
    elif task.name in experts:
        head = experts[task.name].head()
    else:
        raise TaskError(f"no head for task {task.name!r}",
                        fix="build the task's expert, or put its head into "
                        f"<model>/heads/{task.name}.safetensors")
    classes = getattr(head, "out_features", None)
    if classes is not None and classes != task.num_classes:
        raise TaskError(f"the head for task {task.name!r} has {classes} classes, the task "
                        f"{task.num_classes}", fix="use the head trained on this task")
    return head.eval()
