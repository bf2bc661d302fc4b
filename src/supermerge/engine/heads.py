"""Task heads beside a merged model: ``heads/<task>.safetensors`` and ``heads/<task>.json``.

A merge that keeps task heads out of the merge (a merge recipe's ``heads:``, every learned
merge) writes, for each task in the order of the recipe:

- ``heads/<task>.safetensors``: the task's head tensors, under the expert's own names;
- ``heads/<task>.json``: ``{"format", "task", "index", "layout", "expert", "labels",
  "config"}``: how the head attaches (:class:`HeadMeta`), the expert's path, the class
  names when known, and the expert's ``config.json`` (architecture, classes, label names).

:func:`supermerge.eval.load_task_model` puts a task's head on the merged backbone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save

from supermerge.errors import CheckpointError
from supermerge.io import open_checkpoint

Layout = Literal["transformers", "pooled_encoder"]
HEADS_DIR = "heads"
FORMAT = "supermerge.head/1"


@dataclass(frozen=True)
class HeadMeta:
    """What a task's head record says besides its tensors: the expert's config and path,
    the layout (``transformers``: a transformers class from ``config``; ``pooled_encoder``:
    a mean-pooled encoder and a linear head, :mod:`supermerge.learn.modules`) and the
    class names when known."""

    config: Mapping[str, Any] | None = None
    expert: str | Path | None = None
    layout: Layout = "transformers"
    labels: Sequence[str] | None = None


def head_files(heads: Mapping[str, Mapping[str, torch.Tensor]],
               meta: Mapping[str, HeadMeta] | None = None) -> dict[str, bytes]:
    """Return ``{"heads/<task>.safetensors": bytes, "heads/<task>.json": bytes}`` for each
    task of ``heads`` (task -> its head tensors), its index being its position there and
    its record ``meta[task]`` (an empty :class:`HeadMeta` if absent; the expert's path
    made absolute). Costs one serialised copy of each head."""
    files = {}
    for index, (task, head) in enumerate(heads.items()):
        files[f"{HEADS_DIR}/{task}.safetensors"] = save(
            {name: tensor.detach().contiguous() for name, tensor in head.items()})
        about = (meta or {}).get(task) or HeadMeta()
        record = {"format": FORMAT, "task": task, "index": index, "layout": about.layout,
                  "expert": None if about.expert is None else str(Path(about.expert).resolve()),
                  "labels": None if about.labels is None else list(about.labels),
                  "config": None if about.config is None else dict(about.config)}
        files[f"{HEADS_DIR}/{task}.json"] = (json.dumps(record, indent=2) + "\n").encode()
    return files


def heads_card_note(tasks: list[str]) -> str:
    """Return the model card's paragraph on loading a task's model (empty without tasks)."""
    if not tasks:
        return ""
    return (
        "## Task heads\n\n"
        f"Each task's head is kept, never merged: {', '.join(f'`{t}`' for t in tasks)} "
        "(`heads/<task>.safetensors`, with the expert's config in `heads/<task>.json`). "
        f"The model itself carries the first task's head (`{tasks[0]}`) when the base model "
        "had one, else no head. A task's model, ready to use:\n\n"
        "```python\nimport supermerge\n"
        f"model = supermerge.load_task_model(\"<this directory>\", \"{tasks[-1]}\")\n```\n")


@dataclass(frozen=True)
class SavedHead:
    """A task's head as a merge wrote it: its tensors and the expert's config."""

    task: str
    index: int
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any] | None
    expert: str | None = None
    layout: Layout = "transformers"
    labels: list[str] | None = None


def task_names(out_dir: str | Path) -> list[str]:
    """Return the tasks whose heads ``out_dir`` holds, in the recipe's order (empty for
    a merge without heads). Costs one small JSON read per task."""
    records = [_record(path) for path in sorted(Path(out_dir, HEADS_DIR).glob("*.json"))]
    return [str(r["task"]) for r in sorted(records, key=lambda r: int(r["index"]))]


def read_head(out_dir: str | Path, task: int | str) -> SavedHead:
    """Return task ``task``'s head (by name, or by index in the recipe's order).

    Raises CheckpointError naming the tasks there are when ``task`` is not one. Costs
    reading the head's tensors.
    """
    tasks = task_names(out_dir)
    if isinstance(task, int) and not isinstance(task, bool):
        name = tasks[task] if 0 <= task < len(tasks) else None
    else:
        name = str(task) if str(task) in tasks else None
    if name is None:
        raise CheckpointError(
            f"no task {task!r} among this merge's heads ({', '.join(tasks) or 'none'})",
            file=Path(out_dir) / HEADS_DIR,
            fix="pass one of these task names or indices; a merge writes heads when its "
                "recipe sets `heads:` (or it is a learned merge)")
    folder = Path(out_dir) / HEADS_DIR
    record = _record(folder / f"{name}.json")
    with open_checkpoint(folder / f"{name}.safetensors") as checkpoint:
        tensors = {n: checkpoint.read(n) for n in checkpoint.names()}
    return SavedHead(name, int(record["index"]), tensors, record.get("config"),
                     record.get("expert"), record.get("layout") or "transformers",
                     record.get("labels"))


def _record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("format") != FORMAT:
            raise ValueError(f"format {record.get('format')!r}, expected {FORMAT}")
        record["task"], record["index"] = str(record["task"]), int(record["index"])
        return record
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"unreadable head record: {exc}", file=path,
                              fix="merge again to rewrite the heads") from None
