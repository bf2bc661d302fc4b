"""Validation data for learned merges: per task, inputs and (optionally) labels.

A :class:`TaskData` holds inputs as one tensor (passed positionally to the module) or a
dict of tensors (passed as keyword arguments, e.g. ``input_ids`` and ``attention_mask``)
and labels: class indices for classification; token ids with -100 on ignored positions for
causal language modelling; ``None`` for unlabelled data (AdaMerging). ``load_task_data``
reads JSONL or CSV files with an input column and a label column.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from supermerge.learn.errors import LearnError

TaskKind = Literal["classification", "causal_lm"]
Inputs = torch.Tensor | dict[str, torch.Tensor]
IGNORE_INDEX = -100


@dataclass(frozen=True)
class TaskData:
    """Examples of one task; ``source`` names the file they came from, for messages.

    ``teacher`` holds, per example, what the task's expert computes on it (its logits, then
    its blocks' hidden states), for objectives that distil (see
    :func:`~supermerge.learn.distill.attach_teachers`).
    """

    inputs: Inputs
    labels: torch.Tensor | None = None
    source: str | None = None
    teacher: tuple[torch.Tensor, ...] | None = None

    def __post_init__(self) -> None:
        sizes = {len(t) for t in self._input_tensors()}
        if self.labels is not None:
            sizes.add(len(self.labels))
        if len(sizes) > 1:
            raise LearnError(
                f"inputs and labels hold different numbers of examples: {sorted(sizes)}",
                file=self.source,
            )

    def _input_tensors(self) -> list[torch.Tensor]:
        return list(self.inputs.values()) if isinstance(self.inputs, dict) else [self.inputs]

    def __len__(self) -> int:
        return len(self._input_tensors()[0])

    def select(self, index: torch.Tensor) -> TaskData:
        """Return the examples at ``index`` (a view where indexing allows)."""
        inputs = (
            {k: v[index] for k, v in self.inputs.items()}
            if isinstance(self.inputs, dict)
            else self.inputs[index]
        )
        labels = None if self.labels is None else self.labels[index]
        teacher = None if self.teacher is None else tuple(t[index] for t in self.teacher)
        return TaskData(inputs, labels, self.source, teacher)

    def call_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Return (args, kwargs) for the module's forward."""
        if isinstance(self.inputs, dict):
            return (), dict(self.inputs)
        return (self.inputs,), {}


@dataclass(frozen=True)
class Task:
    """A task to merge for: its name (the key of its head), its data and its loss kind."""

    name: str
    data: TaskData
    kind: TaskKind = "classification"


Tokenizer = Callable[..., Any]


def load_task_data(
    path: str | Path,
    *,
    kind: TaskKind = "classification",
    tokenizer: Tokenizer | None = None,
    input_key: str = "input",
    label_key: str = "label",
    label_names: Sequence[str] | None = None,
    max_length: int = 128,
    limit: int | None = None,
    class_labels: bool = True,
    unlabelled: str | Path | None = None,
) -> TaskData:
    """Read a JSONL or CSV file of examples; returns its :class:`TaskData`.

    Inputs are text (tokenised with ``tokenizer``, padded to the longest example) or, in
    JSONL, lists of numbers (a float tensor). Classification labels are integers or, with
    ``label_names``, class names. For ``causal_lm`` the label column, if present, is the
    completion of the input: only its tokens are scored. A file without the label column
    gives unlabelled data. Reads the first ``limit`` examples (all if None).
    ``class_labels=False`` (for methods that read only the inputs) leaves classification
    labels unread, so they need neither class names nor a label on every example; a
    causal-LM completion is part of the text and is always read. ``unlabelled`` names a
    second file whose inputs (same ``input_key``, labels ignored) are appended, labelled
    -100 (classification: left out of the supervised loss) or scored on every token (causal
    LM), for objectives that learn from inputs alone (distillation, entropy).
    """
    path = Path(path)
    rows = _read_rows(path, limit)
    without_input = [i for i, row in enumerate(rows, 1) if input_key not in row]
    if without_input:
        raise LearnError(
            f"example {without_input[0]} has no {input_key!r} field",
            file=path,
            fix=f"every example needs {input_key!r} (input_key) and {label_key!r} (label_key)",
        )
    reads_labels = class_labels or kind == "causal_lm"
    has_label = [reads_labels and label_key in row and row[label_key] not in (None, "")
                 for row in rows]
    if any(has_label) and not all(has_label):
        raise LearnError(
            f"example {has_label.index(False) + 1} has no {label_key!r}, others have one",
            file=path,
            fix="label every example, or none (unlabelled data)",
        )
    inputs = [row[input_key] for row in rows]
    labels = [row[label_key] for row in rows] if all(has_label) else None
    extra = [] if unlabelled is None else _inputs_of(Path(unlabelled), input_key)
    if kind == "causal_lm":
        completions = None if labels is None and not extra else [
            *(labels or [None] * len(inputs)), *[None] * len(extra)]
        return _lm_data(path, inputs + extra, completions, tokenizer, max_length)
    classes = None if labels is None else torch.cat([
        _class_labels(path, labels, label_names),
        torch.full((len(extra),), IGNORE_INDEX, dtype=torch.long)])
    return TaskData(_encode_inputs(path, inputs + extra, tokenizer, max_length), classes,
                    str(path) if unlabelled is None else f"{path} + {unlabelled}")


def _inputs_of(path: Path, input_key: str) -> list[Any]:
    """The ``input_key`` field of every row of an unlabelled file."""
    rows = _read_rows(path, None)
    missing = [i for i, row in enumerate(rows, 1) if input_key not in row]
    if missing:
        raise LearnError(f"example {missing[0]} has no {input_key!r} field", file=path,
                         fix=f"every unlabelled example needs {input_key!r} (input_key)")
    return [row[input_key] for row in rows]


def _read_rows(path: Path, limit: int | None) -> list[dict[str, Any]]:
    if not path.is_file():
        raise LearnError("validation file not found", file=path, fix="check the path")
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8", newline="") as f:
        if suffix == ".jsonl":
            rows = [_json_object(path, number, line)
                    for number, line in enumerate(f, 1) if line.strip()]
        elif suffix in (".csv", ".tsv"):
            rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        else:
            raise LearnError(
                f"unknown validation file type {suffix!r}", file=path,
                fix="use .jsonl or .csv (or .tsv)",
            )
    if not rows:
        raise LearnError("validation file holds no examples", file=path,
                         fix="add labelled examples (about 32 per task)")
    return rows[:limit]


def _json_object(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        row = None
    if not isinstance(row, dict):
        raise LearnError(f"line {number} is not a JSON object", file=path,
                         fix="write one JSON object per line")
    return row


def _tokenize(path: Path, texts: list[str], tokenizer: Tokenizer | None, max_length: int,
              **options: Any) -> dict[str, torch.Tensor]:
    if tokenizer is None:
        raise LearnError("the examples are text but no tokenizer was given", file=path,
                         fix="pass the base model's tokenizer")
    settings = {"padding": True, "truncation": True, "max_length": max_length,
                "return_tensors": "pt"}
    return dict(tokenizer(texts, **(settings | options)))


def _encode_inputs(path: Path, inputs: list[Any], tokenizer: Tokenizer | None,
                   max_length: int) -> Inputs:
    if all(isinstance(x, str) for x in inputs):
        return _tokenize(path, inputs, tokenizer, max_length)
    try:
        return torch.tensor(inputs, dtype=torch.float32)
    except (TypeError, ValueError):
        raise LearnError(
            "inputs must all be text or all be equally long lists of numbers", file=path
        ) from None


def _class_labels(path: Path, labels: list[Any], names: Sequence[str] | None) -> torch.Tensor:
    if names is not None:
        index = {str(n): i for i, n in enumerate(names)}
        unknown = sorted({str(x) for x in labels} - set(index))
        if unknown:
            raise LearnError(f"labels {unknown[:5]} are not among the class names {list(names)}",
                             file=path, fix="fix the labels or label_names")
        return torch.tensor([index[str(x)] for x in labels])
    try:
        values = [int(x) for x in labels]
    except (TypeError, ValueError):
        raise LearnError("labels are not class indices", file=path,
                         fix="use integer labels, or pass label_names to map names") from None
    if any(float(x) != v for x, v in zip(labels, values, strict=True)):
        raise LearnError("labels are not class indices", file=path, fix="use integer labels")
    return torch.tensor(values)


def _lm_data(path: Path, prompts: list[str], completions: Sequence[str | None] | None,
             tokenizer: Tokenizer | None, max_length: int) -> TaskData:
    """Token ids and labels: a completion's tokens are scored, a text without one (None)
    on every token."""
    if tokenizer is not None and getattr(tokenizer, "pad_token", "") is None:
        raise LearnError("the tokenizer has no padding token", file=path,
                         fix="set tokenizer.pad_token = tokenizer.eos_token")
    texts = prompts if completions is None else [
        p + (c or "") for p, c in zip(prompts, completions, strict=True)
    ]
    inputs = _tokenize(path, texts, tokenizer, max_length)
    mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
    labels = inputs["input_ids"].masked_fill(mask == 0, IGNORE_INDEX)
    if completions is not None:  # score the completion only
        prompt_ids = _tokenize(path, prompts, tokenizer, max_length, padding=False,
                               return_tensors=None)["input_ids"]
        starts = mask.argmax(dim=1)  # first real token, whichever side pads
        for row, (start, ids) in enumerate(zip(starts.tolist(), prompt_ids, strict=True)):
            if completions[row] is not None:
                labels[row, start:start + len(ids)] = IGNORE_INDEX
    return TaskData(inputs, labels, str(path))
