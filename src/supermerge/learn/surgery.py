"""Representation Surgery (Yang et al. 2024, *Representation Surgery for Multi-Task Model
Merging*, arXiv 2402.02705): a small per-task module on the merged model's final features
that removes their bias toward the task's expert.

Formula, per task ``t``, with ``z`` the merged model's features (what the task head reads)
and ``z*_t`` the expert's on the same input::

    surgery_t(z) = z - W_up,t ReLU(W_down,t z)           W_down: r x d, W_up: d x r
    minimise  mean_x || surgery_t(z(x)) - z*_t(x) ||_1   over W_down,t, W_up,t (Adam)

trained on the task's unlabelled inputs; the merged weights are not changed. ``W_up``
starts at zero, so training starts from the merged model itself.

Applicable on top of any merged model: ``merge_method: surgery`` merges by task
arithmetic (or TIES) first; ``surgery: true`` in a learn recipe adds it to any learned
method's merge (:func:`with_surgery`). Output: ``surgery.safetensors`` (``<t>.down`` and
``<t>.up`` per task index ``t``) and ``surgery.json`` beside the model;
:func:`supermerge.load_task_model` applies task ``t``'s module in front of its head.

Differences from the paper's code: none in the module or the loss; its features are the
CLIP image embeddings, here those the task head reads (the first position's for a head
that reads every position, as Twin-Merging's router does; applied to every position).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from safetensors.torch import save
from torch import nn

from supermerge.engine.task_state import side_description
from supermerge.errors import CheckpointError
from supermerge.io import open_checkpoint
from supermerge.learn.data import Task
from supermerge.learn.errors import LearnError
from supermerge.learn.features import StartParams, data_free_merge, feature_site, head_features
from supermerge.learn.method import (
    ClosedForm,
    LearnedMethod,
    LearnedOutcome,
    closed_form_run,
    register,
    typed_params,
)
from supermerge.learn.model import Head, eval_mode
from supermerge.learn.statistics import State, finish_state, prepare_pairs
from supermerge.methods.registry import Params
from supermerge.progress import Progress

SURGERY_FILE = "surgery.safetensors"
SURGERY_JSON = "surgery.json"
FORMAT = "supermerge.surgery/1"


class SurgeryParams(Params):
    """Parameters of the surgery modules (``surgery: {...}`` in a learn recipe)."""

    rank: int = Field(16, ge=1, description="width r of each task's surgery module")
    steps: int = Field(200, ge=1, description="Adam steps per task")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    batch_size: int = Field(32, ge=1, description="inputs per step")
    seed: int = Field(0, description="seed of the initialisation and the batches")


class SurgeryMergeParams(StartParams, SurgeryParams):
    """Parameters of ``surgery``: the merge it repairs, then its modules'."""


class Surgery(nn.Module):
    """``z - W_up ReLU(W_down z)`` on the last dimension of ``z``."""

    def __init__(self, features: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(features, rank, bias=False)
        self.up = nn.Linear(rank, features, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return the features with their estimated bias removed (same shape)."""
        return features - self.up(torch.relu(self.down(features)))


def train_surgery(merged: torch.Tensor, expert: torch.Tensor, *, rank: int = 16,
                  steps: int = 200, lr: float = 1e-3, batch_size: int = 32, seed: int = 0,
                  progress: Progress | None = None, stage: str = "surgery") -> Surgery:
    """Return a :class:`Surgery` trained (Adam, minibatches drawn with ``seed``) to minimise
    the mean L1 distance between the surgered ``merged`` features ``[n, d]`` and the
    ``expert``'s ``[n, d]`` on the same inputs. Cost: ``steps`` passes of a ``d x r``
    bottleneck."""
    if merged.shape != expert.shape:
        raise LearnError(f"merged features {list(merged.shape)} and expert features "
                         f"{list(expert.shape)} differ", fix="use the expert of the same task")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = Surgery(merged.shape[1], rank)
    optimiser = torch.optim.Adam(module.parameters(), lr=lr)
    for step in range(1, steps + 1):
        index = torch.randperm(len(merged), generator=generator)[:batch_size]
        loss = (module(merged[index]) - expert[index]).abs().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if progress is not None:
            progress(stage, step, steps)
    return module.eval()


def surgery_files(
    module: nn.Module, merged: Mapping[str, torch.Tensor], experts: Mapping[str, State],
    tasks: Sequence[Task], *, head_prefix: str | None = None,
    heads: Mapping[str, Head] | None = None, progress: Progress | None = None,
    rank: int = 16, steps: int = 200, lr: float = 1e-3, batch_size: int = 32, seed: int = 0,
) -> dict[str, str | bytes]:
    """Return ``surgery.safetensors`` and ``surgery.json`` (name -> bytes or text) for the
    merged tensors ``merged`` (the module's own fill in the rest): one module per expert,
    trained on its task's inputs (experts and tasks paired as Fisher and RegMean pair them).

    Raises LearnError for unfit experts or a task without inputs. Costs per task one
    forward pass of the merged model and of the expert per input, and ``steps`` steps.
    """
    names, pairs, _aliases = prepare_pairs(module, experts, tasks, head_prefix, heads)
    empty = [task.name for _e, task, _h in pairs if len(task.data) == 0]
    if empty:
        raise LearnError(f"task(s) {empty} have no inputs to train the surgery on",
                         fix="give each task some unlabelled inputs")
    weights = {**module.state_dict(), **merged}
    tensors: dict[str, torch.Tensor] = {}
    with eval_mode(module):
        for index, (expert, task, head) in enumerate(pairs):
            site = feature_site(module, head_prefix, head)
            if site is None:
                raise LearnError("surgery acts on the features a task head reads, and this "
                                 "merge has no task head", fix="give head_prefix (the "
                                 "experts' head prefix, e.g. 'classifier.') or heads")
            ours = head_features(module, weights, site, head, task)
            theirs = head_features(module, experts[expert], site, head, task)
            trained = train_surgery(ours, theirs, rank=rank, steps=steps, lr=lr,
                                    batch_size=batch_size, seed=seed, progress=progress,
                                    stage=f"surgery {task.name}")
            tensors[f"{index}.down"] = trained.down.weight.detach().contiguous()
            tensors[f"{index}.up"] = trained.up.weight.detach().contiguous()
    description = {"format": FORMAT, "method": "surgery", "tasks": [e for e, _t, _h in pairs],
                   "rank": rank, "head_prefix": head_prefix}
    return {SURGERY_FILE: save(tensors), SURGERY_JSON: json.dumps(description, indent=2) + "\n"}


SURGERY_NOTE = (
    "## Representation Surgery\n\nEach task's surgery module (`surgery.safetensors`, "
    "described by `surgery.json`) removes the merged features' bias toward its expert; "
    "`supermerge.load_task_model(\"<this directory>\", task)` applies it before the task's "
    "head.\n")


def with_surgery(outcome: LearnedOutcome, module: nn.Module, experts: Mapping[str, State],
                 tasks: Sequence[Task], *, head_prefix: str | None = None,
                 heads: Mapping[str, Head] | None = None, progress: Progress | None = None,
                 **params: Any) -> LearnedOutcome:
    """Return ``outcome`` with surgery modules trained on its merged model (``params``:
    :class:`SurgeryParams`, validated: MethodError naming an invalid one)."""
    options = typed_params("surgery", SurgeryParams, params).model_dump()
    files = surgery_files(module, outcome.state, experts, tasks, head_prefix=head_prefix,
                          heads=heads, progress=progress, **options)
    return replace(outcome, files={**outcome.files, **files},
                   notes=outcome.notes + SURGERY_NOTE)


def surgery_merge(
    module: nn.Module, experts: Mapping[str, State], tasks: Sequence[Task], *,
    head_prefix: str | None = None, heads: Mapping[str, Head] | None = None,
    progress: Progress | None = None, merge: str = "task_arithmetic", scale: float = 0.3,
    density: float = 0.2, rank: int = 16, steps: int = 200, lr: float = 1e-3,
    batch_size: int = 32, seed: int = 0,
) -> ClosedForm:
    """``surgery``: the data-free ``merge`` of the experts, with a surgery module per task
    (see the module docstring). Costs the merge (one read of every expert) and
    :func:`surgery_files`."""
    names, pairs, aliases = prepare_pairs(module, experts, tasks, head_prefix, heads)
    merged = data_free_merge(module, experts, [e for e, _t, _h in pairs], names, merge, scale,
                             density)
    files = surgery_files(module, merged, experts, tasks, head_prefix=head_prefix,
                          heads=heads, progress=progress, rank=rank, steps=steps, lr=lr,
                          batch_size=batch_size, seed=seed)
    state = finish_state(module, experts, pairs[0][0], merged, names, aliases, head_prefix)
    return ClosedForm(state, files=files, notes=SURGERY_NOTE)


@dataclass(frozen=True)
class SurgeryState:
    """The surgery modules of a merged model's directory, by task name, and the head
    prefix whose input they act on."""

    modules: dict[str, Surgery]
    head_prefix: str | None


def read_surgery(out_dir: str | Path) -> SurgeryState:
    """Return the :class:`SurgeryState` of a merged model's directory.

    Raises CheckpointError naming the file if ``surgery.json`` or ``surgery.safetensors``
    is missing, malformed or incomplete. Cost: reads both (small) files.
    """
    with side_description(out_dir, SURGERY_JSON, FORMAT, "surgery",
                          missing="no Representation Surgery here",
                          fix="learn with `surgery: true` or `merge_method: surgery`") as data:
        tasks = [str(t) for t in data["tasks"]]
        head_prefix = data.get("head_prefix")
    tensors_file = Path(out_dir) / SURGERY_FILE
    modules = {}
    with open_checkpoint(tensors_file) as checkpoint:
        for index, task in enumerate(tasks):
            key = f"{index}.down"
            if key not in checkpoint or f"{index}.up" not in checkpoint:
                raise CheckpointError(f"no surgery module for task {task!r}",
                                      file=tensors_file, tensor=key,
                                      fix="merge again: the file is incomplete")
            down, up = checkpoint.read(key), checkpoint.read(f"{index}.up")
            module = Surgery(down.shape[1], down.shape[0])
            module.load_state_dict({"down.weight": down, "up.weight": up})
            modules[task] = module.eval()
    return SurgeryState(modules, head_prefix)


def apply_surgery(site: nn.Module, surgery: Surgery) -> None:
    """Make ``site`` (a task's head) read its input through ``surgery`` from now on."""
    site.register_forward_pre_hook(lambda _module, inputs: (surgery(inputs[0]), *inputs[1:]))


SURGERY = register(LearnedMethod(
    name="surgery",
    summary="a data-free merge (task arithmetic or TIES), then a small module per task that "
    "removes the merged features' bias toward the expert, trained on unlabelled inputs",
    paper="Yang et al. 2024, Representation Surgery for Multi-Task Model Merging "
    "(arXiv 2402.02705)",
    needs="unlabelled",
    params=SurgeryMergeParams,
    run=closed_form_run("surgery", surgery_merge, SurgeryMergeParams),
    trains=True,
))
