"""Per-task state of a merge that serves each task its own model (TALL masks, EMR).

A ``per_task`` method returns, for each tensor, a shared tensor and one boolean mask per
task (:class:`~supermerge.methods.registry.TaskSpecific`), plus one scale per task for the
whole model. The output directory then holds:

- the shared model, an ordinary model directory (``model.safetensors`` ...): usable alone,
  without task ids (for TALL masks it is task arithmetic, for EMR ``base + tau_uni``);
- ``task_state.safetensors``: for every merged tensor ``<name>`` and task ``t``, the mask
  ``mask.<t>.<name>``, packed 1 bit per entry: a 1-D uint8 tensor of ``ceil(numel / 8)``
  bytes, ``numpy.packbits(mask.flatten(), bitorder="little")`` (the last byte zero-padded);
- ``task_state.json``: the method, the base model, the tasks (in the order of the recipe's
  models, named by their paths) with their scales, and the reconstruction rule.

Task t's model is, for every tensor with a mask, ``base + scale_t * mask_t * (shared -
base)`` (:func:`~supermerge.methods.registry.task_tensor`; exactly ``where(mask, shared,
base)`` when the scale is 1), and the shared tensor for every other one (integer buffers).
:func:`load_task_state` rebuilds it; the evaluation harness calls it with the task id.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from supermerge.errors import CheckpointError, MethodError
from supermerge.io import CheckpointWriter, open_checkpoint
from supermerge.io.writer import Layout
from supermerge.methods.registry import TaskSpecific, task_tensor

TASK_STATE_FILE = "task_state.safetensors"
TASK_STATE_JSON = "task_state.json"
FORMAT = "supermerge.task_state/1"
_BIT_ORDER = "little"


def mask_name(task: int, tensor: str) -> str:
    """Return the name of task ``task``'s mask of ``tensor`` in ``task_state.safetensors``."""
    return f"mask.{task}.{tensor}"


def packed_size(numel: int) -> int:
    """Return the bytes of a packed mask of ``numel`` entries: ``ceil(numel / 8)``."""
    return math.ceil(numel / 8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Return a boolean mask packed 1 bit per entry, little bit order, as 1-D uint8.

    Entry ``j`` of the flattened mask is bit ``j % 8`` of byte ``j // 8``. Cost: one CPU
    copy of the mask (1 byte per entry) and the packed result (1 bit per entry).
    """
    flat = mask.detach().reshape(-1).to(device="cpu", dtype=torch.bool).numpy()
    return torch.from_numpy(np.packbits(flat, bitorder=_BIT_ORDER))


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Return the boolean mask of ``shape`` that :func:`pack_mask` packed into ``packed``.

    Raises ValueError if ``packed`` is not 1-D uint8 of ``ceil(numel / 8)`` bytes. Cost: one
    boolean tensor (1 byte per entry).
    """
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (packed_size(numel),):
        raise ValueError(f"a packed mask of {numel} entries is uint8[{packed_size(numel)}], "
                         f"got {str(packed.dtype).removeprefix('torch.')}{list(packed.shape)}")
    bits = np.unpackbits(packed.numpy(), count=numel, bitorder=_BIT_ORDER)
    return torch.from_numpy(bits).to(torch.bool).reshape(tuple(shape))


class TaskStateWriter:
    """Streams a per-task merge's masks into the output and writes ``task_state.json``.

    Give :attr:`side_files` to the :class:`~supermerge.io.CheckpointWriter`; then, for each
    merged tensor, :meth:`add` writes its K packed masks and returns the shared tensor to
    write as the model's; :meth:`finish` writes the JSON. Keeps no tensor.
    """

    def __init__(self, method: str, tasks: Sequence[str], base_model: str | None,
                 merged: Sequence[tuple[str, tuple[int, ...]]]) -> None:
        """``tasks``: the task names, one per expert in order; ``merged``: (name, shape) of
        every tensor the method merges (those that get masks)."""
        self._method = method
        self._tasks = list(tasks)
        self._base_model = base_model
        self._merged = list(merged)
        self._scales: tuple[float, ...] | None = None

    @property
    def side_files(self) -> dict[str, Layout]:
        """The masks' layout: ``{TASK_STATE_FILE: [(mask name, (packed bytes,), uint8)]}``."""
        layout = [(mask_name(t, name), (packed_size(math.prod(shape)),), torch.uint8)
                  for name, shape in self._merged for t in range(len(self._tasks))]
        return {TASK_STATE_FILE: layout}

    def add(self, writer: CheckpointWriter, name: str, result: TaskSpecific) -> torch.Tensor:
        """Write the packed masks of one tensor; return its shared tensor.

        Raises MethodError (naming the tensor) if the method returned something else than a
        TaskSpecific with one boolean mask of the tensor's shape per task, or scales that
        differ from the other tensors'. Cost: packing K masks.
        """
        self._check(name, result)
        for t, mask in enumerate(result.masks):
            writer.add_side(TASK_STATE_FILE, mask_name(t, name), pack_mask(mask))
        return result.shared

    def finish(self, writer: CheckpointWriter) -> None:
        """Write ``task_state.json`` (tasks, scales, base, reconstruction rule)."""
        scales = self._scales or (1.0,) * len(self._tasks)
        state = {
            "format": FORMAT,
            "method": self._method,
            "base_model": self._base_model,
            "masks": TASK_STATE_FILE,
            "mask_encoding": "mask.<task>.<tensor>: uint8, 1-D, ceil(numel / 8) bytes = "
                             f"numpy.packbits(mask.flatten(), bitorder='{_BIT_ORDER}')",
            "reconstruction": "task t: base + scale_t * mask_t * (shared - base) for every "
                              "tensor with a mask, the shared tensor for every other one",
            "tasks": [{"index": i, "name": name, "scale": scale}
                      for i, (name, scale) in enumerate(zip(self._tasks, scales, strict=True))],
        }
        writer.write_text(TASK_STATE_JSON, json.dumps(state, indent=2) + "\n")

    def model_card_note(self) -> str:
        """Markdown for the model card: the model needs task ids, and how to use them."""
        tasks = "\n".join(f"- task {i}: `{name}`" for i, name in enumerate(self._tasks))
        return (
            "## Task-specific state: this model needs task ids\n\n"
            f"**{self._method}** keeps one mask per task (`{TASK_STATE_FILE}`, 1 bit per "
            f"weight) and one scale per task (`{TASK_STATE_JSON}`). The weights in this "
            "directory are the shared model; each task's own model is rebuilt from them, "
            "the base model and the task's mask, with the task id:\n\n"
            "```python\nfrom supermerge.engine import load_task_state\n"
            "state_dict = load_task_state(\"<this directory>\", task=0)\n```\n\n"
            f"Tasks (`task` accepts the id or the model's path):\n\n{tasks}\n"
        )

    def _check(self, name: str, result: object) -> None:
        count = len(self._tasks)
        if not isinstance(result, TaskSpecific):
            raise MethodError(f"method '{self._method}' is per-task but returned "
                              f"{type(result).__name__}, not a TaskSpecific", tensor=name,
                              fix="return TaskSpecific(shared, masks, scales) from the method")
        shape = tuple(result.shared.shape)
        masks_ok = len(result.masks) == count and all(
            m.dtype == torch.bool and tuple(m.shape) == shape for m in result.masks)
        if not masks_ok or len(result.scales) != count:
            raise MethodError(f"method '{self._method}' must return {count} boolean masks of "
                              f"shape {list(shape)} and {count} scales", tensor=name,
                              fix="return one mask and one scale per expert")
        scales = tuple(float(s) for s in result.scales)
        if self._scales is None:
            self._scales = scales
        elif scales != self._scales:
            raise MethodError(f"method '{self._method}' returned scales {scales} here but "
                              f"{self._scales} for earlier tensors", tensor=name,
                              fix="per-task scales are whole-model values: return the same "
                                  "scales for every tensor")


@dataclass(frozen=True)
class TaskState:
    """What ``task_state.json`` says: the method, the base model and the tasks' names and
    scales (in the order of the recipe's models)."""

    directory: Path
    method: str
    base_model: str | None
    tasks: tuple[str, ...]
    scales: tuple[float, ...]

    def index(self, task: int | str) -> int:
        """Return the index of a task given by index, by name (the model path as in the
        recipe), or by that path's last component or stem when only one task has it.

        Raises CheckpointError listing the tasks if there is no such task.
        """
        if isinstance(task, int) and not isinstance(task, bool):
            if 0 <= task < len(self.tasks):
                return task
        elif isinstance(task, str):
            if task in self.tasks:
                return self.tasks.index(task)
            short = [i for i, name in enumerate(self.tasks)
                     if task in (Path(name).name, Path(name).stem)]
            if len(short) == 1:
                return short[0]
        listed = ", ".join(f"{i}: {name}" for i, name in enumerate(self.tasks))
        raise CheckpointError(f"no task {task!r} in this per-task merge",
                              file=self.directory / TASK_STATE_JSON,
                              fix=f"give a task index or name: {listed}")


def read_task_state(out_dir: str | Path) -> TaskState:
    """Return the :class:`TaskState` of a per-task merge's output directory.

    Raises CheckpointError if the directory has no (valid) ``task_state.json``. Cost: reads
    one small JSON file.
    """
    with side_description(out_dir, TASK_STATE_JSON, FORMAT, "task state",
                          missing="not the output of a per-task merge",
                          fix="merge with a per-task method (tall_masks, emr), or load this "
                          "model as it is") as data:
        tasks = data["tasks"]
        return TaskState(directory=Path(out_dir), method=str(data["method"]),
                         base_model=data.get("base_model"),
                         tasks=tuple(str(t["name"]) for t in tasks),
                         scales=tuple(float(t["scale"]) for t in tasks))


@contextmanager
def side_description(out_dir: str | Path, name: str, fmt: str, what: str, *, missing: str,
                     fix: str) -> Iterator[dict[str, Any]]:
    """Yield the JSON object ``out_dir/name`` that a merge wrote beside its model
    (``task_state.json``, ``twin.json``, ...), of format ``fmt``.

    Raises CheckpointError: ``missing`` (with ``fix``) if there is no such file; naming
    the file if it is unreadable, is of another format (``what`` names it), or if reading
    its fields in the block fails (KeyError, TypeError, ValueError). Cost: one small file.
    """
    file = Path(out_dir) / name
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        found = data.get("format") if isinstance(data, dict) else None
    except FileNotFoundError:
        raise CheckpointError(f"{missing} (no {name})", file=out_dir, fix=fix) from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{name} is unreadable: {exc}", file=file,
                              fix="merge again to rewrite it") from None
    if found != fmt:
        raise CheckpointError(f"unknown {what} format {found!r}", file=file,
                              fix=f"this supermerge reads {fmt}; merge again")
    try:
        yield data
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{name} is malformed: {exc!r}", file=file,
                              fix="merge again to rewrite it") from None


def load_task_state(
    out_dir: str | Path,
    task: int | str,
    *,
    base: str | Path | Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Return the state dict of task ``task``'s own model from a per-task merge at ``out_dir``.

    ``task`` is the task's index or name (see :meth:`TaskState.index`). ``base`` is the
    base model (a checkpoint path, or its state dict already in memory); by default the
    base recorded in ``task_state.json``. Each tensor is in the shared model's dtype, on
    CPU: ``base + scale * mask * (shared - base)`` where the tensor has a mask, else the
    shared tensor.

    Cost: one pass: reads every tensor of the shared model once, and the base's tensor and
    this task's packed mask (1 bit per entry) for each merged one; holds the returned
    model plus one tensor's temporaries. Raises CheckpointError if the directory, its
    masks or the base cannot be read or do not match.
    """
    out_dir = Path(out_dir)
    state = read_task_state(out_dir)
    index = state.index(task)
    scale = state.scales[index]
    with open_checkpoint(out_dir) as shared, open_checkpoint(out_dir / TASK_STATE_FILE) as masks, \
            _base_tensors(base if base is not None else state.base_model, out_dir) as read_base:
        model = {}
        for name in shared.names():
            tensor = shared.read(name)
            key = mask_name(index, name)
            if key in masks:
                try:
                    mask = unpack_mask(masks.read(key), tensor.shape)
                except ValueError as exc:
                    raise CheckpointError(f"the mask does not fit the tensor: {exc}",
                                          file=masks.path, tensor=key,
                                          fix="merge again: the masks and the model differ"
                                          ) from None
                tensor = task_tensor(read_base(name), tensor, mask, scale)
            model[name] = tensor
    return model


@contextmanager
def _base_tensors(
    base: str | Path | Mapping[str, torch.Tensor] | None, out_dir: Path
) -> Iterator[Callable[[str], torch.Tensor]]:
    """Yield a reader of the base model's tensors by name, from a path or a state dict."""
    if base is None:
        raise CheckpointError("task_state.json names no base model", file=out_dir,
                              fix="pass base=<path of the base model>")
    if isinstance(base, Mapping):
        def read(name: str) -> torch.Tensor:
            if name not in base:
                raise CheckpointError("the base state dict has no tensor of this name",
                                      tensor=name, fix="pass the base model the merge used")
            return base[name]

        yield read
        return
    with open_checkpoint(base) as checkpoint:
        yield checkpoint.read
