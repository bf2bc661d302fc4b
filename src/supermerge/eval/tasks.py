"""Tasks: labelled texts with fixed, seeded, disjoint splits and a metric.

A :class:`Task` holds every example of one classification task. Its splits are fixed by
its labels, its seed and its :class:`SplitSizes`:

- ``test``: scored for experts and merges, never seen by any merge;
- ``validation``: the small labelled set (32 by default) learned merges and parameter
  searches may use;
- ``train``: what the task's expert is fine-tuned on.

The splits are *stratified prefixes* of one seeded order of the examples (see
:func:`stratified_order`): test is taken first, then validation, then train, so a task's
test split does not move when the validation or train sizes change.

The metric is accuracy, or macro-F1 where classes are unbalanced (the largest class more
than 1.5 times the smallest): a model that ignores a rare class must not score well.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Literal

from supermerge.errors import SupermergeError

Metric = Literal["accuracy", "macro_f1"]
Split = Literal["train", "validation", "test"]
IMBALANCE = 1.5
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")


class TaskError(SupermergeError):
    """A task cannot be built: bad labels, too few examples, unreadable file."""


class TaskUnavailable(TaskError):
    """A task's data is not installed here (a data package, or the Debian fortunes)."""


@dataclass(frozen=True)
class SplitSizes:
    """How many examples each split takes at most (train: the cap on what is left)."""

    test: int = 400
    validation: int = 32
    train: int = 1500


@dataclass(frozen=True)
class Task:
    """One classification task: its examples, class names, splits and metric.

    ``labels[i]`` indexes ``label_names``. ``source`` says where the data came from and
    ``licence`` under which terms (both shown in reports). ``metric`` defaults to
    :func:`choose_metric` of the labels.
    """

    name: str
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]
    source: str = ""
    licence: str = ""
    sizes: SplitSizes = field(default_factory=SplitSizes)
    seed: int = 0
    metric: Metric | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", tuple(self.texts))
        object.__setattr__(self, "labels", tuple(int(y) for y in self.labels))
        object.__setattr__(self, "label_names", tuple(self.label_names))
        if len(self.texts) != len(self.labels):
            raise TaskError(f"task {self.name!r} has {len(self.texts)} texts but "
                            f"{len(self.labels)} labels", file=self.source or None)
        if len(self.label_names) < 2:
            raise TaskError(f"task {self.name!r} has {len(self.label_names)} class(es)",
                            file=self.source or None, fix="a task needs at least 2 classes")
        bad = sorted({y for y in self.labels if not 0 <= y < len(self.label_names)})
        if bad:
            raise TaskError(f"task {self.name!r} has labels {bad[:5]} outside "
                            f"0..{len(self.label_names) - 1}", file=self.source or None)
        if self.metric is None:
            object.__setattr__(self, "metric", choose_metric(self.labels))
        train = len(self.splits["train"])
        if train < len(self.label_names) or not self.splits["test"]:
            raise TaskError(
                f"task {self.name!r} has {len(self.texts)} examples: too few to split into "
                f"test, validation and train", file=self.source or None,
                fix="give at least 10 examples per class",
            )

    @property
    def num_classes(self) -> int:
        """The number of classes."""
        return len(self.label_names)

    @cached_property
    def splits(self) -> dict[Split, tuple[int, ...]]:
        """Indices of each split (disjoint, stable for a given seed; computed once).

        When the task is small, test takes at most a quarter of the examples and
        validation at most a tenth.
        """
        order = stratified_order(self.labels, self.seed)
        n = len(order)
        test = min(self.sizes.test, n // 4)
        validation = min(self.sizes.validation, n // 10)
        rest = order[test + validation:]
        return {
            "test": tuple(order[:test]),
            "validation": tuple(order[test:test + validation]),
            "train": tuple(rest[:self.sizes.train]),
        }

    def examples(self, split: Split) -> tuple[list[str], list[int]]:
        """Return (texts, labels) of one split, in split order."""
        index = self.splits[split]
        return [self.texts[i] for i in index], [self.labels[i] for i in index]

    def score(self, predictions: Sequence[int], labels: Sequence[int]) -> float:
        """Return the task's metric of ``predictions`` against ``labels``."""
        if self.metric == "macro_f1":
            return macro_f1(predictions, labels, self.num_classes)
        return accuracy(predictions, labels)

    def with_sizes(self, sizes: SplitSizes) -> Task:
        """Return the same task with other split sizes."""
        return replace(self, sizes=sizes)

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 of everything an expert depends on: examples, classes, splits, metric."""
        digest = hashlib.sha256()
        head = {"name": self.name, "labels": self.label_names, "seed": self.seed,
                "sizes": [self.sizes.test, self.sizes.validation, self.sizes.train],
                "metric": self.metric}
        digest.update(json.dumps(head, sort_keys=True).encode())
        for text, label in zip(self.texts, self.labels, strict=True):
            digest.update(f"{label}\t{len(text)}\t{text}".encode())
        return digest.hexdigest()


def stratified_order(labels: Sequence[int], seed: int) -> list[int]:
    """Return a seeded order of ``range(len(labels))`` whose every prefix is stratified.

    Each class is shuffled; its r-th member (of n) gets the key (r + u) / n with u uniform
    in [0, 1), and all examples are sorted by key. Any prefix then holds each class in
    proportion to its size (within one example). Costs O(N log N).
    """
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    keyed = []
    for y in sorted(by_class):
        members = by_class[y]
        rng.shuffle(members)
        keyed += [((rank + rng.random()) / len(members), i) for rank, i in enumerate(members)]
    keyed.sort()
    return [i for _, i in keyed]


def choose_metric(labels: Sequence[int]) -> Metric:
    """Return "macro_f1" if the largest class exceeds 1.5 x the smallest, else "accuracy"."""
    counts = Counter(labels).values()
    return "macro_f1" if max(counts) > IMBALANCE * min(counts) else "accuracy"


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to their label (0.0 for no examples)."""
    if not labels:
        return 0.0
    return sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels)


def macro_f1(predictions: Sequence[int], labels: Sequence[int], num_classes: int) -> float:
    """Unweighted mean over the classes present in ``labels`` of each class's F1."""
    true_pos, predicted, actual = Counter(), Counter(predictions), Counter(labels)
    for p, y in zip(predictions, labels, strict=True):
        if p == y:
            true_pos[y] += 1
    scores = [2 * true_pos[c] / (predicted[c] + actual[c])
              for c in range(num_classes) if actual[c]]
    return sum(scores) / len(scores) if scores else 0.0


def balance(
    pairs: Sequence[tuple[str, str]], per_class: int, min_count: int, seed: int = 0
) -> tuple[list[str], list[int], list[str]]:
    """Deduplicate, drop rare classes, cap each class; returns (texts, labels, class names).

    A text seen twice is kept once, under its first label (so no text sits in two
    splits). Classes with fewer than ``min_count`` texts are dropped; the others keep a
    seeded sample of at most ``per_class`` texts. Class names are sorted.
    """
    by_class: dict[str, list[str]] = defaultdict(list)
    for text, label in deduplicate(pairs):
        by_class[label].append(text)
    names = sorted(c for c, texts in by_class.items() if len(texts) >= min_count)
    rng = random.Random(seed)
    texts, labels = [], []
    for index, name in enumerate(names):
        members = by_class[name]
        rng.shuffle(members)
        texts += members[:per_class]
        labels += [index] * min(per_class, len(members))
    return texts, labels, names


def deduplicate(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Return the (stripped text, label) pairs in order, each non-empty text once (its
    first label), so that no text can sit in two splits."""
    first: dict[str, str] = {}
    for text, label in pairs:
        text = text.strip()
        if text:
            first.setdefault(text, label)
    return list(first.items())


def task_from_file(
    path: str | Path,
    *,
    name: str | None = None,
    text_key: str = "text",
    label_key: str = "label",
    sizes: SplitSizes | None = None,
    seed: int = 0,
) -> Task:
    """Read a task from a JSONL or CSV/TSV file of ``text`` and ``label`` fields.

    Labels are class names (or numbers, read as names); classes are sorted by name, or
    numerically when all are integers. Duplicate texts are kept once. The task is named
    after the file unless ``name`` is given. Costs one read of the file.
    """
    path = Path(path)
    if not path.is_file():
        raise TaskError("task file not found", file=path, fix="check the path")
    rows = _read_rows(path)
    missing = next((i for i, row in enumerate(rows, 1)
                    if not row.get(text_key) or row.get(label_key) in (None, "")), None)
    if missing is not None:
        raise TaskError(f"example {missing} lacks {text_key!r} or {label_key!r}", file=path,
                        fix=f"give every example a {text_key!r} and a {label_key!r} field")
    pairs = deduplicate([(str(row[text_key]), str(row[label_key])) for row in rows])
    names = sorted({label for _, label in pairs})
    if all(n.lstrip("-").isdigit() for n in names):
        names.sort(key=int)
    index = {n: i for i, n in enumerate(names)}
    return Task(name or path.stem, tuple(t for t, _ in pairs),
                tuple(index[label] for _, label in pairs), tuple(names),
                source=str(path), sizes=sizes or SplitSizes(), seed=seed)


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8", newline="") as f:
        if suffix in (".jsonl", ".json"):
            rows = []
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise TaskError(f"line {number} is not JSON: {err.msg}", file=path,
                                        fix="write one JSON object per line") from None
            return rows
        if suffix in (".csv", ".tsv"):
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    raise TaskError(f"unknown task file type {suffix!r}", file=path,
                    fix="use .jsonl, .csv or .tsv")
