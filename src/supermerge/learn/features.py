"""What the learned methods that act on a merged model's features share: where a task
head reads its features, capturing them, and the data-free merge they start from
(Twin-Merging's shared expert, Representation Surgery's merged model)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from supermerge.learn.data import Task
from supermerge.learn.model import Head, run_with_head
from supermerge.learn.objectives import logits_of
from supermerge.learn.statistics import BATCH, State
from supermerge.methods.primitives import Density
from supermerge.methods.registry import Params, get_method


class StartParams(Params):
    """The data-free merge a method starts from (Twin-Merging's shared expert, the model
    Representation Surgery repairs)."""

    merge: Literal["task_arithmetic", "ties"] = Field(
        "task_arithmetic", description="the data-free merge of the experts it starts from")
    scale: float = Field(0.3, alias="lambda", allow_inf_nan=False,
                         description="lambda of that merge")
    density: Density = Field(0.2, description="merge: ties: fraction of entries kept")


def pooled_features(features: torch.Tensor) -> torch.Tensor:
    """Return one feature vector per input: the first position's for ``[batch, positions,
    hidden]`` (the [CLS] state), the features themselves for ``[batch, hidden]``."""
    if features.dim() == 3:
        return features[:, 0]
    return features.reshape(len(features), -1)


@contextmanager
def head_inputs(site: nn.Module | None, into: list[torch.Tensor]) -> Iterator[None]:
    """While open, append to ``into`` the input of every call of ``site`` (the task head);
    with no site the caller appends the module's outputs itself."""
    if site is None:
        yield
        return

    def hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
        into.append(pooled_features(inputs[0].detach()))

    handle = site.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def feature_site(module: nn.Module, head_prefix: str | None,
                 head: Head | None) -> nn.Module | None:
    """The module whose input is the features: a module head, the head under
    ``head_prefix``, or None (the module's output is the features)."""
    if isinstance(head, nn.Module):
        return head
    if head_prefix:
        try:
            return module.get_submodule(head_prefix.rstrip("."))
        except AttributeError:
            return None
    return None


def head_features(module: nn.Module, weights: Mapping[str, torch.Tensor],
                  site: nn.Module | None, head: Head | None, task: Task) -> torch.Tensor:
    """Return ``[n, f]``: the features the head reads when the module runs on ``weights``
    over each of ``task``'s inputs. Cost: one no-grad forward pass per example."""
    found: list[torch.Tensor] = []
    with torch.no_grad(), head_inputs(site, found):
        for start in range(0, len(task.data), BATCH):
            batch = task.data.select(torch.arange(start, min(start + BATCH, len(task.data))))
            args, kwargs = batch.call_args()
            output = run_with_head(module, weights, head, args, kwargs)
            if site is None:
                found.append(pooled_features(logits_of(output).detach()))
    return torch.cat(found).float()


def data_free_merge(module: nn.Module, experts: Mapping[str, State], order: Sequence[str],
                    names: Sequence[str], method: str, scale: float,
                    density: float) -> dict[str, torch.Tensor]:
    """Return the tensors ``names`` merged from the experts (in ``order``) over the module's
    own (base) tensors by registry method ``method`` (task_arithmetic or ties) with
    ``lambda = scale`` (ties: ``density``), each in the base's dtype. Cost: reads every
    expert's tensors once, one tensor of each at a time."""
    merge = get_method(method)
    options = {"lambda": scale, **({"density": density} if method == "ties" else {})}
    base = module.state_dict()
    return {name: merge(base[name], [experts[e][name] for e in order], **options
                        ).to(base[name].dtype) for name in names}
